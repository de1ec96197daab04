package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"nstarget/tests/etcdtest"
)

// hungTest is the deadline that fails a test which waits for an event that never comes; it
// is not a measure of speed.
const hungTest = 30 * time.Second

// startEtcd runs a one-member etcd in this process on random loopback ports, with the short
// ticks of the measured setup (TickMs 10, ElectionMs 100), and stops it when the test ends.
func startEtcd(t *testing.T) string {
	t.Helper()
	start := time.Now()
	e, err := etcdtest.Start(t.TempDir(), hungTest)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Stop)
	t.Logf("etcd ready on %s in %v", e.URL, time.Since(start).Round(time.Millisecond))
	return e.URL
}

func newClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() && os.Getenv("CLUSTER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// recorder is every node's Handler in one place: it checks, at each callback, that no tenant
// is ever held by two nodes (held: between Acquire and Release or Lost), and lets tests wait
// for a state.
type recorder struct {
	mu      sync.Mutex
	holder  map[string]string // tenant → node
	acquire map[string]time.Time
	lostAt  map[string]time.Time
	updates map[string]int64    // node → last document revision passed by Update
	standby map[string][]string // node → last tenants passed by Standby
	bad     []string
	changed chan struct{} // closed and replaced on every change
	// fail, if set, makes Acquire of (node, tenant) fail while it returns true.
	fail func(node, tenant string) bool
}

func newRecorder() *recorder {
	return &recorder{holder: map[string]string{}, acquire: map[string]time.Time{}, lostAt: map[string]time.Time{},
		updates: map[string]int64{}, standby: map[string][]string{}, changed: make(chan struct{})}
}

func (r *recorder) notify() { close(r.changed); r.changed = make(chan struct{}) }

// handler is one node's view of the recorder.
type handler struct {
	r    *recorder
	node string
}

func (h handler) Acquire(ctx context.Context, tenant string, doc Doc) error {
	r := h.r
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	if !slices.Contains(doc.Tenants, tenant) {
		r.bad = append(r.bad, fmt.Sprintf("%s: Acquire(%s) with a document that does not list it", h.node, tenant))
	}
	// A careful caller: Lost cancels ctx before it runs, so checking ctx under the lock
	// Lost also takes means an Acquire racing with Lost either is undone by it or refused.
	if err := ctx.Err(); err != nil {
		return err
	}
	if r.fail != nil && r.fail(h.node, tenant) {
		return errors.New("test: acquire refused")
	}
	if other, ok := r.holder[tenant]; ok {
		r.bad = append(r.bad, fmt.Sprintf("%s: Acquire(%s) while %s holds it", h.node, tenant, other))
	}
	r.holder[tenant] = h.node
	r.acquire[tenant] = time.Now()
	return nil
}

func (h handler) Release(tenant string) {
	r := h.r
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	if r.holder[tenant] != h.node {
		r.bad = append(r.bad, fmt.Sprintf("%s: Release(%s) of a tenant it does not hold (holder %q)", h.node, tenant, r.holder[tenant]))
		return
	}
	delete(r.holder, tenant)
}

func (h handler) Update(doc Doc) {
	r := h.r
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	r.updates[h.node] = doc.Revision
}

func (h handler) Standby(tenants []string, doc Doc) {
	r := h.r
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	for _, t := range tenants {
		if !slices.Contains(doc.Tenants, t) {
			r.bad = append(r.bad, fmt.Sprintf("%s: Standby(%s) with a document that does not list it", h.node, t))
		}
	}
	r.standby[h.node] = slices.Clone(tenants)
}

func (h handler) Lost() {
	r := h.r
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	r.lostAt[h.node] = time.Now()
	for t, n := range r.holder {
		if n == h.node {
			delete(r.holder, t)
		}
	}
}

// waitFor waits for cond (checked under the lock) to hold after some callback.
func (r *recorder) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(hungTest)
	for {
		r.mu.Lock()
		ok, ch := cond(), r.changed
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("waited %v for %s", hungTest, what)
		}
	}
}

// holds reports whether tenants are held exactly as want says (under the lock).
func (r *recorder) holds(want map[string]string) bool {
	if len(r.holder) != len(want) {
		return false
	}
	for tn, n := range want {
		if r.holder[tn] != n {
			return false
		}
	}
	return true
}

func (r *recorder) check(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range r.bad {
		t.Error(b)
	}
}

func (r *recorder) snapshot() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]string, len(r.holder))
	for k, v := range r.holder {
		out[k] = v
	}
	return out
}

// cutter is the test hook on a node's transport: once cut, the connections to etcd become a
// black hole (writes vanish, reads never return) and new ones fail, as in a partition. etcd
// is untouched; the node hears no error, only silence.
type cutter struct {
	cut   atomic.Bool
	mu    sync.Mutex
	conns []net.Conn
}

func (c *cutter) dial(ctx context.Context, addr string) (net.Conn, error) {
	if c.cut.Load() {
		return nil, errors.New("test: network cut")
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	c.mu.Unlock()
	return &cutConn{Conn: conn, c: c}, nil
}

// heal ends the cut; the connections it silenced are reset, as a long partition leaves them.
func (c *cutter) heal() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
	c.cut.Store(false)
}

type cutConn struct {
	net.Conn
	c *cutter
}

func (cc *cutConn) Write(b []byte) (int, error) {
	if cc.c.cut.Load() {
		return len(b), nil
	}
	return cc.Conn.Write(b)
}

func (cc *cutConn) Read(b []byte) (int, error) {
	for {
		n, err := cc.Conn.Read(b)
		if err != nil || !cc.c.cut.Load() {
			return n, err
		}
		// Cut: drop what arrives and keep waiting until the connection is closed.
	}
}

// cluster is a test cluster: one etcd, a recorder, nodes started on demand.
type testCluster struct {
	t        *testing.T
	endpoint string
	prefix   string
	rec      *recorder
	cli      *clientv3.Client // the test's own client
	nodes    map[string]*testNode
}

type testNode struct {
	name   string
	cancel context.CancelFunc
	done   chan error
	cut    *cutter
}

func newTestCluster(t *testing.T) *testCluster {
	ep := startEtcd(t)
	return &testCluster{t: t, endpoint: ep, prefix: "/test", rec: newRecorder(), cli: newClient(t, ep), nodes: map[string]*testNode{}}
}

func (c *testCluster) publish(tenants []string) Published {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	p, err := Publish(ctx, c.cli, c.prefix, tenants, []byte(fmt.Sprintf("# %d tenants\n", len(tenants))))
	if err != nil {
		c.t.Fatal(err)
	}
	return p
}

func (c *testCluster) start(name string, ttl time.Duration) *testNode {
	c.t.Helper()
	tn := &testNode{name: name, done: make(chan error, 1), cut: &cutter{}}
	n, err := New(Config{
		Endpoints: []string{c.endpoint}, Name: name, Prefix: c.prefix, LeaseTTL: ttl,
		DialTimeout: time.Second, Logger: testLogger(c.t).With("test", c.t.Name()),
		dial: tn.cut.dial, retryBase: 100 * time.Millisecond,
	}, handler{c.rec, name})
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tn.cancel = cancel
	go func() { tn.done <- n.Run(ctx) }()
	c.nodes[name] = tn
	c.t.Cleanup(func() {
		if err := c.stop(name); err != nil {
			c.t.Errorf("node %s left with an error: %v", name, err)
		}
	})
	return tn
}

// stop cancels the node and waits for Run to return; it returns Run's error.
func (c *testCluster) stop(name string) error {
	tn := c.nodes[name]
	if tn == nil {
		return nil
	}
	delete(c.nodes, name)
	tn.cancel()
	select {
	case err := <-tn.done:
		return err
	case <-time.After(hungTest):
		c.t.Errorf("node %s: Run did not return", name)
		return nil
	}
}

// owners reads the owner keys from etcd: tenant → node name.
func (c *testCluster) owners() map[string]string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hungTest)
	defer cancel()
	k := keys{c.prefix}
	resp, err := c.cli.Get(ctx, k.owners(), clientv3.WithPrefix())
	if err != nil {
		c.t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		var v ownerValue
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			c.t.Fatalf("%s: %v", kv.Key, err)
		}
		out[strings.TrimPrefix(string(kv.Key), k.owners())] = v.Node
	}
	return out
}
