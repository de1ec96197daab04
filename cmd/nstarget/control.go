package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"nstarget/conf"
	"nstarget/netnsmux"
	"nstarget/target"
)

// The control socket: a root-only unix socket (0600 in a 0700 directory) on which serve answers
// one JSON request per connection with one JSON answer. Requests: {"op":"status","tenant":""}.
// A client that sends garbage gets an error; one that hangs is cut off after controlDeadline;
// at most controlClients are served at once. None of it can stall the data path: status
// reads each connection's counters under its lock, briefly.

const (
	controlDeadline = 5 * time.Second
	controlClients  = 16
	controlMaxReq   = 64 << 10
)

type controlRequest struct {
	Op     string `json:"op"`
	Tenant string `json:"tenant,omitempty"`
}

type controlReply struct {
	Error   string   `json:"error,omitempty"`
	Status  *status  `json:"status,omitempty"`
	Changes []string `json:"changes,omitempty"` // reload: what changed (none: nothing to do)
	TookMs  float64  `json:"took_ms,omitempty"` // reload: from reading the file to the change in force
}

// status is what `nstarget status -o json` prints.
type status struct {
	Version string         `json:"version"`
	Total   target.Usage   `json:"total"`
	Pool    *poolStatus    `json:"pool,omitempty"`
	Tenants []tenantStatus `json:"tenants"`
}

type tenantStatus struct {
	Name     string               `json:"name"`
	Netns    string               `json:"netns"`
	NetnsID  uint64               `json:"netns_id,omitempty"`
	State    string               `json:"state"`
	Portal   string               `json:"portal"`
	Error    string               `json:"error,omitempty"`
	Usage    target.Usage         `json:"usage"`
	Targets  []targetStatus       `json:"targets"`
	Sessions []target.SessionInfo `json:"sessions"`
}

type targetStatus struct {
	IQN  string      `json:"iqn"`
	LUNs []lunStatus `json:"luns"`
}

type lunStatus struct {
	ID       uint64 `json:"id"`
	Volume   string `json:"volume"`
	Size     int64  `json:"size"`
	ReadOnly bool   `json:"read_only"`
	// Reservation is the I_T nexus holding a reservation ("" none), ReservationType its kind.
	Reservation     string `json:"reservation,omitempty"`
	ReservationType string `json:"reservation_type,omitempty"`
}

// Tenant states as status reports them.
const (
	stateWaiting = "waiting for namespace"
	stateServing = "serving"
	stateFailed  = "listen failed"
)

// nsState is what netnsmux last said about a tenant's namespace and listener.
type nsState struct {
	state string
	id    uint64
	err   string
}

// control serves the control socket. It learns the target server and namespace events from
// serve through setServer and event; the configuration is fixed for its lifetime.
type control struct {
	cfg *conf.Config // as started; the service's once it runs
	log *slog.Logger
	srv atomic.Pointer[target.Server]
	svc atomic.Pointer[service]

	mu    sync.Mutex
	state map[string]nsState // by netns name

	ln   net.Listener
	sem  chan struct{}
	wg   sync.WaitGroup
	done chan struct{}
}

func newControl(cfg *conf.Config, log *slog.Logger) *control {
	c := &control{cfg: cfg, log: log, state: make(map[string]nsState), sem: make(chan struct{}, controlClients), done: make(chan struct{})}
	for _, tn := range cfg.Tenants {
		c.state[tn.Netns] = nsState{state: stateWaiting}
	}
	return c
}

// listen binds the socket. A stale socket file (nobody answers on it) is replaced; a live one
// means another nstarget owns it: an error if the configuration named the path, else serve
// goes on without a control socket and says why.
func (c *control) listen() error {
	path := c.cfg.Server.ControlSocket
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	if d, err := net.DialTimeout("unix", path, time.Second); err == nil {
		d.Close()
		err := fmt.Errorf("control socket %s: another nstarget answers on it", path)
		if c.cfg.Server.ControlSocketSet {
			return err
		}
		c.log.Warn("no control socket: status and reload are not available", "err", err)
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("control socket %s: remove stale: %w", path, err)
	}
	// The socket is created with the umask's mode: make it 0600 from the start.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	c.ln = ln
	c.log.Info("control socket", "path", path)
	c.wg.Add(1)
	go c.acceptLoop()
	return nil
}

// close stops accepting, waits for the clients being served and removes the socket.
func (c *control) close() {
	if c.ln == nil {
		return
	}
	close(c.done)
	c.ln.Close()
	c.wg.Wait()
}

func (c *control) acceptLoop() {
	defer c.wg.Done()
	for {
		nc, err := c.ln.Accept()
		if err != nil {
			select {
			case <-c.done:
				return
			default:
			}
			c.log.Warn("control socket accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		select {
		case c.sem <- struct{}{}:
		default:
			// Busy: refuse rather than queue, so hung clients cannot pile up.
			json.NewEncoder(nc).Encode(controlReply{Error: "busy: too many control clients"})
			nc.Close()
			continue
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			defer func() { <-c.sem }()
			c.serveClient(nc)
		}()
	}
}

func (c *control) serveClient(nc net.Conn) {
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(controlDeadline))
	sc := bufio.NewScanner(nc)
	sc.Buffer(make([]byte, 4096), controlMaxReq)
	var reply controlReply
	if !sc.Scan() {
		reply.Error = "no request: send one JSON object and a newline"
		if err := sc.Err(); err != nil {
			reply.Error = fmt.Sprintf("bad request: %v", err)
		}
	} else {
		// The request is in: a reload may take longer than a hung client is given.
		nc.SetDeadline(time.Time{})
		reply = c.handle(sc.Bytes())
		nc.SetDeadline(time.Now().Add(controlDeadline))
	}
	json.NewEncoder(nc).Encode(reply)
}

func (c *control) handle(line []byte) controlReply {
	var req controlRequest
	if err := json.Unmarshal(line, &req); err != nil {
		return controlReply{Error: fmt.Sprintf("bad request: %v", err)}
	}
	switch req.Op {
	case "reload":
		svc := c.svc.Load()
		if svc == nil {
			return controlReply{Error: "starting: not serving yet"}
		}
		t0 := time.Now()
		changes, err := svc.reload()
		if err != nil {
			return controlReply{Error: err.Error()}
		}
		return controlReply{Changes: changes, TookMs: float64(time.Since(t0).Microseconds()) / 1000}
	case "status":
		st, err := c.status(req.Tenant)
		if err != nil {
			return controlReply{Error: err.Error()}
		}
		return controlReply{Status: st}
	default:
		return controlReply{Error: fmt.Sprintf("unknown op %q (known: status, reload)", req.Op)}
	}
}

// event records what netnsmux says about a tenant's namespace and listener.
func (c *control) event(ev netnsmux.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st, ok := c.state[ev.Namespace]
	if !ok {
		st = nsState{state: stateWaiting} // a tenant added by a reload
	}
	switch ev.Kind {
	case netnsmux.NamespaceAdded, netnsmux.NamespaceReplaced:
		st.id = uint64(ev.ID)
	case netnsmux.NamespaceRemoved:
		st = nsState{state: stateWaiting}
	case netnsmux.ListenerUp:
		st.state, st.err, st.id = stateServing, "", uint64(ev.ID)
	case netnsmux.ListenerFailed:
		st.state = stateFailed
		if ev.Err != nil {
			st.err = ev.Err.Error()
		}
	}
	c.state[ev.Namespace] = st
}

func (c *control) status(only string) (*status, error) {
	srv := c.srv.Load()
	if srv == nil {
		return nil, errors.New("starting: the target is not up yet")
	}
	stats := srv.Stats()
	out := &status{Version: version(), Total: stats.Total, Tenants: []tenantStatus{}}
	found := false
	cfg := c.cfg
	svc := c.svc.Load()
	if svc != nil {
		cfg = svc.current()
		if svc.pool != nil {
			out.Pool = poolStatusOf(svc.pool, cfg.Server.DataDir, cfg.Server.PoolSoftThreshold)
		}
	}
	for _, tn := range cfg.Tenants {
		if only != "" && tn.Name != only {
			continue
		}
		found = true
		c.mu.Lock()
		ns, ok := c.state[tn.Netns]
		c.mu.Unlock()
		if !ok {
			ns.state = stateWaiting
		}
		ts := tenantStatus{Name: tn.Name, Netns: tn.Netns, NetnsID: ns.id, State: ns.state, Portal: tn.Portal,
			Error: ns.err, Usage: stats.Tenants[tn.Name], Sessions: srv.Sessions(tn.Name), Targets: []targetStatus{}}
		if ts.Sessions == nil {
			ts.Sessions = []target.SessionInfo{}
		}
		for _, tg := range tn.Targets {
			t := targetStatus{IQN: tg.IQN, LUNs: []lunStatus{}}
			for _, l := range tg.LUNs {
				ls := lunStatus{ID: l.ID, Volume: l.Volume, Size: l.Size, ReadOnly: l.ReadOnly}
				if svc != nil {
					if lu := svc.lu(tn.Netns, tg.IQN, l.ID); lu != nil {
						ls.Reservation, ls.ReservationType = lu.Reservation()
					}
				}
				t.LUNs = append(t.LUNs, ls)
			}
			ts.Targets = append(ts.Targets, t)
		}
		out.Tenants = append(out.Tenants, ts)
	}
	if only != "" && !found {
		return nil, fmt.Errorf("no tenant %q", only)
	}
	return out, nil
}

// askControl sends one request to the control socket at path and returns the reply.
func askControl(ctx context.Context, path string, req controlRequest) (*controlReply, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w (is nstarget serve running? -socket names another path)", path, err)
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	if err := json.NewEncoder(nc).Encode(req); err != nil {
		return nil, fmt.Errorf("control socket %s: send: %w", path, err)
	}
	var reply controlReply
	if err := json.NewDecoder(nc).Decode(&reply); err != nil {
		return nil, fmt.Errorf("control socket %s: read reply: %w", path, err)
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return &reply, nil
}
