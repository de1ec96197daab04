package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Defaults of Config.
const (
	DefaultLeaseTTL    = 10 * time.Second
	DefaultDialTimeout = 5 * time.Second
	DefaultParallel    = 8
)

// Config is one node's view of the cluster.
type Config struct {
	Endpoints []string // etcd client URLs
	Name      string   // this node, unique in the cluster; no '/'
	Address   string   // shown by Status (e.g. the node's management address); optional
	Prefix    string   // key prefix, e.g. "/nstarget"
	// LeaseTTL is how long etcd keeps this node's keys after its last keepalive: the
	// longest a dead node's tenants wait for a new owner. Whole seconds; default 10s. etcd
	// raises it to its own minimum (1.5 election timeouts).
	LeaseTTL time.Duration
	// Margin is how long before the lease can expire in etcd this node calls Lost: the time
	// the caller may take to stop serving, plus timer slack. Default LeaseTTL/4.
	Margin      time.Duration
	DialTimeout time.Duration // per etcd connection attempt and per request; default 5s
	// TLS and Username/Password, if set, secure the etcd connection: the published
	// document may hold CHAP secrets.
	TLS                *tls.Config
	Username, Password string
	// Parallel bounds the claims, Acquires and Releases in flight; default 8.
	Parallel int
	Logger   *slog.Logger // default slog.Default()

	// dial, for tests only, replaces the TCP dialer of the etcd connection so a test can
	// cut this node off without touching etcd.
	dial func(ctx context.Context, addr string) (net.Conn, error)
	// retryBase is the first delay before a failed Acquire is retried (doubling up to
	// retryMax); tests shorten it.
	retryBase time.Duration
}

const (
	defaultRetryBase = time.Second
	retryMax         = time.Minute
)

// Handler is what the caller does with ownership. Callbacks for one tenant never overlap,
// except Lost, which does not wait for anything. Acquire and Release of different tenants may
// run concurrently (up to Config.Parallel).
type Handler interface {
	// Acquire is called once this node's owner key for tenant is in etcd, bound to its
	// lease: the caller fences the previous owner's storage, opens the volumes, brings the
	// network up and serves, then returns nil. An error makes the node give the tenant up
	// (delete its owner key) and retry later with backoff; the caller must then hold
	// nothing of it. ctx ends when the lease is lost or the node is stopping.
	Acquire(ctx context.Context, tenant string, doc Doc) error
	// Release asks the caller to stop serving tenant cleanly: it moves elsewhere, was
	// removed from the set, or the node is stopping. Only after Release returns is the
	// owner key deleted, which lets the next owner claim it.
	Release(tenant string)
	// Update passes a newer published document while the caller holds tenants (those
	// acquired and not released): the caller applies it to them. Tenants the new document
	// moves or removes are released before, new ones acquired after.
	Update(doc Doc)
	// Lost means this node cannot prove its lease is alive: the caller stops serving every
	// tenant at once, including one whose Acquire is still running (its ctx is already
	// cancelled) or whose Release has not returned. It is called before the lease can
	// expire in etcd, so before anyone else can claim those tenants, and may run
	// concurrently with Acquire or Release. No Release follows for those tenants; the
	// node later joins again with a new lease and Acquires afresh.
	Lost()
}

// StandbyHandler is what a Handler may also implement to keep a hot standby: to prepare, in
// the background, for taking over the tenants this node would be given if another node died
// (e.g. open their volumes without their locks), so that a takeover only has to fence, lock
// and serve.
type StandbyHandler interface {
	// Standby passes the tenants this node would be given if any one other live node died
	// (Standby of the live nodes), each time that set or the document changes, after the
	// node's own claims and releases of the round are done. It must return at once. The
	// tenants are still someone else's: the caller must neither serve them nor fence
	// anything of theirs; it gets Acquire for those it is given, as for any other tenant.
	Standby(tenants []string, doc Doc)
}

// Node takes part in the cluster: it keeps a lease, registers under nodes/, and claims and
// releases tenants as placement says. Create with New, run with Run.
type Node struct {
	cfg  Config
	keys keys
	h    Handler
	log  *slog.Logger
}

// New checks cfg, fills its defaults and returns a node ready to Run.
func New(cfg Config, h Handler) (*Node, error) {
	if h == nil {
		return nil, errors.New("cluster: nil Handler")
	}
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("cluster: no etcd endpoints")
	}
	if err := checkName("node", cfg.Name); err != nil {
		return nil, err
	}
	k, err := newKeys(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < time.Second || cfg.LeaseTTL%time.Second != 0 {
		return nil, fmt.Errorf("cluster: lease TTL %v: whole seconds, at least 1s", cfg.LeaseTTL)
	}
	if cfg.Margin == 0 {
		cfg.Margin = cfg.LeaseTTL / 4
	}
	if cfg.Margin <= 0 || cfg.Margin > cfg.LeaseTTL/2 {
		return nil, fmt.Errorf("cluster: margin %v: more than 0, at most half the lease TTL %v", cfg.Margin, cfg.LeaseTTL)
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Parallel <= 0 {
		cfg.Parallel = DefaultParallel
	}
	if cfg.retryBase == 0 {
		cfg.retryBase = defaultRetryBase
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Node{cfg: cfg, keys: k, h: h, log: log.With("node", cfg.Name)}, nil
}

// Run takes part in the cluster until ctx ends, then leaves it in order: it deletes its node
// key, Releases every tenant and deletes each owner key after its Release (so the next owners
// need not wait for the lease to expire), and revokes the lease. It returns nil after such a
// leave, or what went wrong during it (an owner key that could not be deleted goes with the
// lease, at the latest when it expires), or an invalid etcd client configuration.
//
// Neither an unreachable etcd nor a lost lease ends Run: after Lost it joins again with a new
// lease, with backoff. Run owns every goroutine it starts (the lease keeper and its watchdog
// timer, the reconciler and its job workers) and returns only when they have ended; callbacks
// never run after Run has returned.
func (n *Node) Run(ctx context.Context) error {
	cc := clientv3.Config{
		Endpoints:   n.cfg.Endpoints,
		DialTimeout: n.cfg.DialTimeout,
		Logger:      zap.NewNop(), // errors that matter come back to us and go to slog
		TLS:         n.cfg.TLS,
		Username:    n.cfg.Username,
		Password:    n.cfg.Password,
	}
	if n.cfg.dial != nil {
		cc.DialOptions = append(cc.DialOptions, grpc.WithContextDialer(n.cfg.dial))
	}
	cli, err := clientv3.New(cc)
	if err != nil {
		return fmt.Errorf("cluster: etcd client for %v: %w", n.cfg.Endpoints, err)
	}
	defer cli.Close()
	// The lease's keepalives get a connection of their own: on the shared one they would
	// queue behind whatever else is in flight on it (a takeover's claims, the watch stream
	// delivering a large tenant set), and a keepalive that is late is a lease lost.
	kcli, err := clientv3.New(cc)
	if err != nil {
		return fmt.Errorf("cluster: etcd client for %v: %w", n.cfg.Endpoints, err)
	}
	defer kcli.Close()

	started := time.Now().UTC()
	const firstBackoff = 100 * time.Millisecond
	backoff := firstBackoff
	for {
		began := time.Now()
		err := n.session(ctx, cli, kcli, started)
		if ctx.Err() != nil {
			return err // the leave's own errors, if any
		}
		if time.Since(began) > n.cfg.LeaseTTL {
			backoff = firstBackoff // it had worked for a while: not a crash loop
		}
		n.log.Warn("cluster session ended; joining again", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, n.cfg.LeaseTTL)
	}
}

// errLost ends a session whose lease can no longer be trusted.
var errLost = errors.New("cluster: lease lost")

// session is one lease's life: grant, register, reconcile until ctx ends (leave in order) or
// the lease is lost.
func (n *Node) session(ctx context.Context, cli, kcli *clientv3.Client, started time.Time) error {
	// sctx ends when the lease is lost or the session is over; it is not a child of ctx
	// because a leave needs etcd after ctx has ended.
	sctx, scancel := context.WithCancel(context.WithoutCancel(ctx))
	defer scancel()

	gctx, cancel := context.WithTimeout(ctx, n.cfg.DialTimeout)
	sent := time.Now()
	grant, err := cli.Grant(gctx, int64(n.cfg.LeaseTTL/time.Second))
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped while (re)joining: nothing to leave
		}
		return fmt.Errorf("cluster: grant lease: %w", err)
	}
	lease := grant.ID
	ttl := time.Duration(grant.TTL) * time.Second
	log := n.log.With("lease", int64(lease))
	lost := make(chan struct{})
	stopKeeper := startKeeper(sctx, kcli, lease, sent, ttl, n.cfg.Margin, log, func(reason string) {
		// Cancel first: in-flight Acquires see it before the caller's Lost runs.
		scancel()
		close(lost)
		log.Error("lease lost: stopping every tenant", "reason", reason)
		n.h.Lost()
	})
	defer stopKeeper()
	// Whatever ends the session, the lease goes: at once if etcd answers, else by expiry.
	// Revoking after a loss only shortens the wait of the next owners.
	defer func() {
		stopKeeper()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.cfg.DialTimeout)
		defer cancel()
		if _, err := cli.Revoke(rctx, lease); err != nil {
			log.Info("lease not revoked; it will expire", "err", err)
		}
	}()

	if err := n.register(ctx, sctx, cli, lease, started, log); err != nil || ctx.Err() != nil {
		return err
	}
	log.Info("joined cluster", "ttl", ttl, "margin", n.cfg.Margin)
	r := newReconciler(n, cli, lease, log)
	err = r.run(ctx, sctx)
	select {
	case <-lost:
		return errLost
	default:
	}
	return err
}

// register creates nodes/<name> bound to lease, waiting while another lease holds the name: a
// node restarted after a crash waits out its previous incarnation, and two processes
// configured with one name cannot both run.
func (n *Node) register(ctx, sctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, started time.Time, log *slog.Logger) error {
	key := n.keys.node(n.cfg.Name)
	val, err := json.Marshal(nodeValue{Name: n.cfg.Name, Address: n.cfg.Address, Started: started})
	if err != nil {
		return err
	}
	for {
		if err := ctx.Err(); err != nil {
			return nil // leaving before having joined
		}
		if err := sctx.Err(); err != nil {
			return errLost
		}
		rctx, cancel := context.WithTimeout(sctx, n.cfg.DialTimeout)
		resp, err := cli.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(val), clientv3.WithLease(lease))).
			Else(clientv3.OpGet(key)).
			Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("cluster: register %s: %w", key, err)
		}
		if resp.Succeeded {
			return nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 1 && clientv3.LeaseID(kvs[0].Lease) == lease {
			return nil
		}
		var other int64
		if len(kvs) == 1 {
			other = kvs[0].Lease
		}
		log.Warn("node name held by another lease (a previous run, or another process with this name); waiting for it to go", "key", key, "other_lease", other)
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(sctx))
		wch := cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1))
	wait:
		for {
			select {
			case <-ctx.Done():
				wcancel()
				return nil
			case wr, ok := <-wch:
				if !ok || wr.Err() != nil {
					break wait // try again; the Txn reports a dead etcd
				}
				for _, ev := range wr.Events {
					if ev.Type == clientv3.EventTypeDelete {
						break wait
					}
				}
			}
		}
		wcancel()
	}
}
