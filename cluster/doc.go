// Package cluster decides which node of an nstarget cluster owns which tenant, using etcd for
// membership and ownership, and tells its caller when to start and stop serving a tenant.
//
// It owns: the keys under a configurable prefix (see the layout below), this node's lease and
// its local expiry watchdog (on an etcd connection of its own), the placement function (Place)
// and what follows from it (Standby: what this node would get if another died), the
// compare-and-set claims of tenants, and the order of the caller's callbacks (Handler, and
// StandbyHandler if the caller keeps a hot standby).
//
// It must never: know what a tenant is made of (iSCSI targets, volumes, namespaces: the
// published document is opaque bytes to it, validated by whoever publishes it), touch the
// network or storage of a tenant, call Acquire for a tenant before its owner key is bound to
// this node's lease, delete an owner key before Release of that tenant has returned, or let the
// lease run out while the caller may still be serving: Lost is called before the lease can
// expire for the other nodes (see keeper).
//
// Key layout under Prefix (e.g. "/nstarget"):
//
//	<prefix>/tenants         the published tenant set: JSON {version, tenants, sha256, body,
//	                         published}; body is the caller's document (the TOML text of the
//	                         tenants), tenants the names to place. Written by Publish.
//	<prefix>/nodes/<name>    one per live node, bound to its lease; JSON {name, address,
//	                         started}. Created only when absent, so two processes cannot run
//	                         under one name and a restarted node waits out its old lease.
//	<prefix>/owners/<tenant> the owner, bound to the owner's lease; JSON {node, since}.
//	                         Created only when absent (compare-and-set on CreateRevision 0);
//	                         deleted by its owner after Release, or by etcd when the lease
//	                         expires.
//
// Safety rests on two things only: the owner key's create-if-absent transaction (at most one
// key, hence one lease, per tenant) and the lease watchdog (a node stops serving before its
// lease can expire, so before anyone else can create the key). Placement, watches and caches
// only decide who tries when; a stale view can delay a move but never give a tenant two
// owners. Fencing the storage of a previous owner remains the caller's second line of defence.
package cluster
