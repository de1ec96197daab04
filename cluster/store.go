package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Doc is the published tenant set as a node sees it.
type Doc struct {
	// Revision is the etcd revision that last wrote <prefix>/tenants: newer documents have
	// larger revisions.
	Revision int64
	SHA256   string   // hex digest of Body
	Tenants  []string // the names to place, sorted
	Body     []byte   // the publisher's document, opaque here (the TOML text of the tenants)
}

// envelope is the JSON stored at <prefix>/tenants. The names travel beside the body so every
// node places the same set without parsing the body: nodes of different versions could
// disagree about a body, never about the names.
type envelope struct {
	Version   int       `json:"version"`
	Tenants   []string  `json:"tenants"`
	SHA256    string    `json:"sha256"`
	Body      []byte    `json:"body"`
	Published time.Time `json:"published"`
}

const envelopeVersion = 1

// nodeValue is <prefix>/nodes/<name>.
type nodeValue struct {
	Name    string    `json:"name"`
	Address string    `json:"address,omitempty"`
	Started time.Time `json:"started"`
}

// ownerValue is <prefix>/owners/<tenant>. The lease it is bound to, not the name, is what
// proves ownership: a restarted node has the same name and a new lease.
type ownerValue struct {
	Node  string    `json:"node"`
	Since time.Time `json:"since"`
}

// keys derives the layout from a prefix; see the package comment.
type keys struct{ prefix string }

func newKeys(prefix string) (keys, error) {
	p := strings.TrimRight(prefix, "/")
	if p == "" || !strings.HasPrefix(p, "/") {
		return keys{}, fmt.Errorf("cluster: prefix %q must start with '/' and name something", prefix)
	}
	return keys{p}, nil
}

func (k keys) root() string               { return k.prefix + "/" }
func (k keys) tenants() string            { return k.prefix + "/tenants" }
func (k keys) nodes() string              { return k.prefix + "/nodes/" }
func (k keys) owners() string             { return k.prefix + "/owners/" }
func (k keys) node(name string) string    { return k.nodes() + name }
func (k keys) owner(tenant string) string { return k.owners() + tenant }

// checkName rejects what cannot be the last element of a key: the names become key suffixes
// and a '/' would make one tenant look like a directory of another.
func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("cluster: empty %s name", what)
	}
	if strings.ContainsAny(s, "/\x00") || len(s) > 253 {
		return fmt.Errorf("cluster: %s name %q: no '/' or NUL, at most 253 bytes", what, s)
	}
	return nil
}

func decodeEnvelope(rev int64, raw []byte) (Doc, error) {
	var e envelope
	if err := json.Unmarshal(raw, &e); err != nil {
		return Doc{}, fmt.Errorf("cluster: tenant set at revision %d: %w", rev, err)
	}
	if e.Version != envelopeVersion {
		return Doc{}, fmt.Errorf("cluster: tenant set at revision %d: version %d, this node reads %d", rev, e.Version, envelopeVersion)
	}
	sum := sha256.Sum256(e.Body)
	if hex.EncodeToString(sum[:]) != e.SHA256 {
		return Doc{}, fmt.Errorf("cluster: tenant set at revision %d: body does not match its sha256", rev)
	}
	for _, t := range e.Tenants {
		if err := checkName("tenant", t); err != nil {
			return Doc{}, fmt.Errorf("cluster: tenant set at revision %d: %w", rev, err)
		}
	}
	return Doc{Revision: rev, SHA256: e.SHA256, Tenants: uniqueSorted(e.Tenants), Body: e.Body}, nil
}

// Published is what Publish did.
type Published struct {
	Revision int64  // of <prefix>/tenants now
	SHA256   string // of the body
	Changed  bool   // false: the same names and body were already published
}

// Publish stores the tenant set: the names to place and the caller's document (body), which
// the caller has validated. Publishing what is already published writes nothing, so nodes see
// no change. Concurrent publishers do not overwrite each other blindly: the write is
// conditional on the revision read, and a conflict is an error to retry.
func Publish(ctx context.Context, cli *clientv3.Client, prefix string, tenants []string, body []byte) (Published, error) {
	k, err := newKeys(prefix)
	if err != nil {
		return Published{}, err
	}
	names := uniqueSorted(tenants)
	if len(names) != len(tenants) {
		return Published{}, errors.New("cluster: publish: a tenant name is listed twice")
	}
	for _, t := range names {
		if err := checkName("tenant", t); err != nil {
			return Published{}, fmt.Errorf("cluster: publish: %w", err)
		}
	}
	sum := sha256.Sum256(body)
	digest := hex.EncodeToString(sum[:])

	cur, err := cli.Get(ctx, k.tenants())
	if err != nil {
		return Published{}, fmt.Errorf("cluster: publish: read %s: %w", k.tenants(), err)
	}
	var modRev int64 // 0: absent
	if len(cur.Kvs) == 1 {
		kv := cur.Kvs[0]
		modRev = kv.ModRevision
		if d, err := decodeEnvelope(kv.ModRevision, kv.Value); err == nil && d.SHA256 == digest && slices.Equal(d.Tenants, names) {
			return Published{Revision: kv.ModRevision, SHA256: digest}, nil
		}
	}
	val, err := json.Marshal(envelope{Version: envelopeVersion, Tenants: names, SHA256: digest, Body: body, Published: time.Now().UTC()})
	if err != nil {
		return Published{}, fmt.Errorf("cluster: publish: %w", err)
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k.tenants()), "=", modRev)).
		Then(clientv3.OpPut(k.tenants(), string(val))).
		Commit()
	if err != nil {
		return Published{}, fmt.Errorf("cluster: publish %s: %w", k.tenants(), err)
	}
	if !resp.Succeeded {
		return Published{}, fmt.Errorf("cluster: publish %s: changed by someone else meanwhile; try again", k.tenants())
	}
	return Published{Revision: resp.Header.Revision, SHA256: digest, Changed: true}, nil
}

// Report is the cluster as etcd sees it, for `nstarget cluster status`.
type Report struct {
	Revision int64          `json:"revision"` // etcd revision of the snapshot
	Doc      *DocReport     `json:"doc"`      // nil: nothing published
	Nodes    []NodeReport   `json:"nodes"`
	Tenants  []TenantReport `json:"tenants"`
	Strays   []TenantReport `json:"strays,omitempty"` // owner keys of tenants not in the set
	Errors   []string       `json:"errors,omitempty"` // unreadable values, skipped
}

// DocReport describes the published tenant set.
type DocReport struct {
	Revision  int64     `json:"revision"`
	SHA256    string    `json:"sha256"`
	Tenants   int       `json:"tenants"`
	Bytes     int       `json:"bytes"`
	Published time.Time `json:"published"`
}

// NodeReport is one live node.
type NodeReport struct {
	Name    string    `json:"name"`
	Address string    `json:"address,omitempty"`
	Started time.Time `json:"started"`
	Lease   int64     `json:"lease"`
	// TTL is how long the lease lives from now on without a keepalive, in whole seconds
	// as etcd reports it; negative: the lease is gone.
	TTL        time.Duration `json:"-"`
	TTLSeconds int64         `json:"ttl_seconds"`
	Owns       int           `json:"owns"`
	Placed     int           `json:"placed"`
}

// TenantReport is one tenant: who owns it now and where placement wants it. They differ
// while a tenant moves, while its owner's lease runs out, or while an Acquire is retried.
type TenantReport struct {
	Name   string `json:"name"`
	Owner  string `json:"owner,omitempty"` // "" : unowned
	Lease  int64  `json:"lease,omitempty"`
	Placed string `json:"placed,omitempty"` // "" : no live node
}

// Status reads the cluster in one consistent snapshot (one Get of the prefix) and asks etcd
// for the remaining TTL of each node's lease.
func Status(ctx context.Context, cli *clientv3.Client, prefix string) (*Report, error) {
	k, err := newKeys(prefix)
	if err != nil {
		return nil, err
	}
	resp, err := cli.Get(ctx, k.root(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("cluster: status: read %s: %w", k.root(), err)
	}
	r := &Report{Revision: resp.Header.Revision, Nodes: []NodeReport{}, Tenants: []TenantReport{}}
	var doc Doc
	owners := map[string]TenantReport{}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		switch {
		case key == k.tenants():
			d, err := decodeEnvelope(kv.ModRevision, kv.Value)
			if err != nil {
				r.Errors = append(r.Errors, err.Error())
				continue
			}
			var e envelope
			_ = json.Unmarshal(kv.Value, &e) // decoded above
			doc = d
			r.Doc = &DocReport{Revision: d.Revision, SHA256: d.SHA256, Tenants: len(d.Tenants), Bytes: len(d.Body), Published: e.Published}
		case strings.HasPrefix(key, k.nodes()):
			var v nodeValue
			if err := json.Unmarshal(kv.Value, &v); err != nil {
				r.Errors = append(r.Errors, fmt.Sprintf("%s: %v", key, err))
			}
			r.Nodes = append(r.Nodes, NodeReport{Name: strings.TrimPrefix(key, k.nodes()), Address: v.Address, Started: v.Started, Lease: kv.Lease})
		case strings.HasPrefix(key, k.owners()):
			var v ownerValue
			if err := json.Unmarshal(kv.Value, &v); err != nil {
				r.Errors = append(r.Errors, fmt.Sprintf("%s: %v", key, err))
			}
			t := strings.TrimPrefix(key, k.owners())
			owners[t] = TenantReport{Name: t, Owner: v.Node, Lease: kv.Lease}
		}
	}
	live := make([]string, len(r.Nodes))
	for i := range r.Nodes {
		live[i] = r.Nodes[i].Name
		ttl, err := cli.TimeToLive(ctx, clientv3.LeaseID(r.Nodes[i].Lease))
		switch {
		case err != nil:
			r.Errors = append(r.Errors, fmt.Sprintf("node %s: lease %x: %v", r.Nodes[i].Name, r.Nodes[i].Lease, err))
		default:
			r.Nodes[i].TTL, r.Nodes[i].TTLSeconds = time.Duration(ttl.TTL)*time.Second, ttl.TTL
		}
	}
	place := Place(doc.Tenants, live)
	byNode := map[string]*NodeReport{}
	for i := range r.Nodes {
		byNode[r.Nodes[i].Name] = &r.Nodes[i]
	}
	for _, t := range doc.Tenants {
		tr := owners[t]
		delete(owners, t)
		tr.Name, tr.Placed = t, place[t]
		r.Tenants = append(r.Tenants, tr)
		if n := byNode[tr.Owner]; n != nil && n.Lease == tr.Lease {
			n.Owns++
		}
		if n := byNode[tr.Placed]; n != nil {
			n.Placed++
		}
	}
	for _, tr := range owners {
		r.Strays = append(r.Strays, tr)
	}
	slices.SortFunc(r.Strays, func(a, b TenantReport) int { return strings.Compare(a.Name, b.Name) })
	return r, nil
}
