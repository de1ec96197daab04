package cluster_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"nstarget/tests/svgplot"
)

// The goal of issue 12: a node that dies with 300 tenants has them all served by one other
// node within 2 s of its lease expiring.
const (
	goalMoved = 300
	goalAfter = 2 * time.Second
	benchTTL  = 2 * time.Second // lease_ttl of newNode
)

// failoverRounds is how many failovers each case times; the medians are reported.
// NSTARGET_FAILOVER_ROUNDS overrides it.
func failoverRounds() int {
	if n, err := strconv.Atoi(os.Getenv("NSTARGET_FAILOVER_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 3
}

// BenchmarkFailover kills (SIGKILL) one of two nodes sharing N tenants (1, 100, 300, 600: the
// victim owns half, so with 600 the survivor takes over 300 at once, the goal's case) and times
// until every tenant of the killed node serves again on the survivor, as an initiator sees it:
// from the initiators' switch, through the tenant's own network, a TCP connection to its portal
// is accepted (the moment reported as serving) and an iSCSI login to its target succeeds.
//
// Times are taken from the SIGKILL and from the lease's expiry, which is when etcd deletes the
// killed node's keys (a watch of the test's own in-process etcd sees it): what happens before
// that is the lease's TTL and etcd's expiry check, not the takeover. Each case runs
// failoverRounds rounds; the medians are reported, every round is logged, and the goal's
// case prints the goal next to what was measured. Plotted against the tenants moved to
// bench/results/failover-vs-tenants.svg.
//
// To study a round: NSTARGET_FAILOVER_LOGS=dir keeps both nodes' logs (the survivor's
// "takeover profile" lines and the rbd "fenced" lines say where the time went), and
// NSTARGET_FAILOVER_PERF=dir records the survivor with perf during the takeover.
func BenchmarkFailover(b *testing.B) {
	total := svgplot.Series{Name: "kill to every moved tenant accepting (2 s lease included)"}
	after := svgplot.Series{Name: "lease expiry to every moved tenant accepting"}
	login := svgplot.Series{Name: "lease expiry to every moved tenant logged in (iSCSI)"}
	for _, n := range []int{1, 100, 300, 600} {
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			var rs []failoverResult
			for b.Loop() {
				for range failoverRounds() {
					r := failoverOnce(b, n)
					b.Logf("round %d: %s (load %s)", len(rs)+1, r, loadavg())
					rs = append(rs, r)
				}
			}
			m := medianResult(rs)
			b.ReportMetric(m.toServe.Seconds(), "s-to-serve")
			b.ReportMetric(m.toExpiry.Seconds(), "s-to-expiry")
			b.ReportMetric(m.afterExpiry.Seconds(), "s-after-expiry")
			b.ReportMetric(m.loginAfterExpiry.Seconds(), "s-login-after-expiry")
			b.ReportMetric(float64(m.moved), "tenants-moved")
			b.Logf("median of %d rounds: %s", len(rs), m)
			if m.moved >= goalMoved {
				verdict := "met"
				if m.afterExpiry > goalAfter {
					verdict = "NOT met"
				}
				b.Logf("goal: %d tenants taken over by one node, serving within %v of the lease expiring; measured: %d tenants, every one accepting %.2f s after expiry (logged in: %.2f s), median of %d rounds: %s",
					goalMoved, goalAfter, m.moved, m.afterExpiry.Seconds(), m.loginAfterExpiry.Seconds(), len(rs), verdict)
			}
			x := float64(m.moved)
			total.X, total.Y = append(total.X, x), append(total.Y, m.toServe.Seconds())
			after.X, after.Y = append(after.X, x), append(after.Y, m.afterExpiry.Seconds())
			login.X, login.Y = append(login.X, x), append(login.Y, m.loginAfterExpiry.Seconds())
		})
	}
	p := svgplot.Plot{Title: "Failover: one of two nodes SIGKILLed, the other takes its tenants (2 s lease, medians)",
		YLabel: "seconds", Series: []svgplot.Series{total, after, login}, Goal: goalAfter.Seconds(),
		GoalName: "goal: 300 moved, serving 2 s after the lease expired"}
	if err := p.Write("../../bench/results/failover-vs-tenants.svg"); err != nil {
		b.Log(err)
	}
}

// failoverResult is one failover: durations from the SIGKILL and from the lease's expiry.
type failoverResult struct {
	moved            int
	toExpiry         time.Duration // SIGKILL to etcd deleting the victim's keys
	toServe          time.Duration // SIGKILL to every moved tenant accepting
	afterExpiry      time.Duration // expiry to every moved tenant accepting
	loginAfterExpiry time.Duration // expiry to every moved tenant logged in
	firstAfterExpiry time.Duration // expiry to the first moved tenant accepting
	phases           [nPhases]time.Duration
}

// The survivor's takeover, phase by phase, from its "takeover profile" log lines: each is the
// moment (after the lease's expiry) the last moved tenant was through it.
const (
	phaseHeard   = iota // the survivor's watch delivered the expiry
	phaseClaimed        // its owner keys created (batched claims)
	phaseStarted        // the first Acquire began
	phaseOpened         // images fenced (blocklist, lock break), locked and open
	phaseNet            // tenant networks up (namespace, interface, address, GARP)
	phaseApplied        // the reloads that serve them done (listeners follow)
	nPhases
)

var phaseNames = [nPhases]string{"heard", "claimed", "acquiring", "images", "network", "reloaded"}

func (r failoverResult) String() string {
	var tl []string
	for i, d := range r.phases {
		tl = append(tl, fmt.Sprintf("%s %.2f", phaseNames[i], d.Seconds()))
	}
	return fmt.Sprintf("%d moved; kill→expiry %.2f s, expiry→first accepting %.2f s, expiry→all accepting %.2f s, expiry→all logged in %.2f s, kill→all accepting %.2f s; after expiry, all through: %s s",
		r.moved, r.toExpiry.Seconds(), r.firstAfterExpiry.Seconds(), r.afterExpiry.Seconds(), r.loginAfterExpiry.Seconds(), r.toServe.Seconds(), strings.Join(tl, ", "))
}

// standbyState is what n's last "cluster: standby" line of its current run says.
func standbyState(n *node) (tenants, missing int, ok bool) {
	cur := fmt.Sprintf("[%d] ", n.starts)
	lines := strings.Split(n.log(), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		rest, found := strings.CutPrefix(lines[i], cur)
		if !found || !strings.Contains(rest, `"msg":"cluster: standby"`) {
			continue
		}
		var m struct{ Tenants, Missing int }
		if json.Unmarshal([]byte(rest), &m) != nil {
			return 0, 0, false
		}
		return m.Tenants, m.Missing, true
	}
	return 0, 0, false
}

// takeoverPhases reads the survivor's last takeover profiles (claims, acquire) and returns
// when, after exp, each phase was over; a phase it cannot find is left zero.
func takeoverPhases(n *node, exp time.Time) (out [nPhases]time.Duration) {
	var claims, acq map[string]any
	cur := fmt.Sprintf("[%d] ", n.starts)
	for l := range strings.SplitSeq(n.log(), "\n") {
		rest, ok := strings.CutPrefix(l, cur)
		if !ok || !strings.Contains(rest, "takeover profile") {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(rest), &m) != nil {
			continue
		}
		switch m["msg"] {
		case "takeover profile: claims":
			claims = m
		case "takeover profile: acquire":
			acq = m
		}
	}
	at := func(m map[string]any, k string) (time.Time, bool) {
		s, _ := m[k].(string)
		t, err := time.Parse(time.RFC3339Nano, s)
		return t, err == nil
	}
	if t, ok := at(claims, "heard_at"); ok {
		out[phaseHeard] = t.Sub(exp)
	}
	if t, ok := at(claims, "began_at"); ok {
		if d, ok := claims["batched_claims"].(float64); ok {
			out[phaseClaimed] = t.Add(time.Duration(d)).Sub(exp)
		}
	}
	first, ok := at(acq, "first_at")
	if !ok {
		return out
	}
	out[phaseStarted] = first.Sub(exp)
	for i, stage := range map[int]string{phaseOpened: "open", phaseNet: "net", phaseApplied: "apply"} {
		s, _ := acq[stage].(string) // "last 1.2s sum … max …"
		f := strings.Fields(s)
		if len(f) < 2 {
			continue
		}
		if d, err := time.ParseDuration(f[1]); err == nil {
			out[i] = first.Add(d).Sub(exp)
		}
	}
	return out
}

func medianResult(rs []failoverResult) failoverResult {
	med := func(f func(failoverResult) time.Duration) time.Duration {
		v := make([]time.Duration, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	var phases [nPhases]time.Duration
	for i := range phases {
		phases[i] = med(func(r failoverResult) time.Duration { return r.phases[i] })
	}
	return failoverResult{moved: rs[0].moved, phases: phases,
		toExpiry:         med(func(r failoverResult) time.Duration { return r.toExpiry }),
		toServe:          med(func(r failoverResult) time.Duration { return r.toServe }),
		afterExpiry:      med(func(r failoverResult) time.Duration { return r.afterExpiry }),
		loginAfterExpiry: med(func(r failoverResult) time.Duration { return r.loginAfterExpiry }),
		firstAfterExpiry: med(func(r failoverResult) time.Duration { return r.firstAfterExpiry }),
	}
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

func failoverOnce(b *testing.B, n int) failoverResult {
	dir := b.TempDir()
	sockDir, err := os.MkdirTemp("", "nc")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sw := makeSwitch(b)
	k := seq.Add(1)
	keys := fmt.Sprintf("/%s-%d", prefix, k)
	na := newNode(b, dir, sockDir, keys, "na", fmt.Sprintf("%su%da", prefix, k))
	nb := newNode(b, dir, sockDir, keys, "nb", fmt.Sprintf("%su%db", prefix, k))
	uplink(b, sw, na.up)
	uplink(b, sw, nb.up)
	na.start()
	nb.start()
	// The tenants come in steps of 100 (each step's set holding the previous one), so that
	// bringing them up is not itself a takeover of 300 tenants per node: on a loaded 2-core
	// machine that made the nodes miss their 2 s leases before the measurement began.
	doc := dir + "/tenants.toml"
	for step := min(n, 100); ; step = min(n, step+100) {
		if err := os.WriteFile(doc, []byte(tenantsDoc(step)), 0o600); err != nil {
			b.Fatal(err)
		}
		run(b, bin, "cluster", "apply", "-c", doc, "-endpoints", etcd.URL, "-prefix", keys)
		waitFor(b, fmt.Sprintf("%d tenants placed", step), func() error {
			if _, settled := owners(b, keys); !settled {
				return fmt.Errorf("not settled")
			}
			return nil
		})
		if step == n {
			break
		}
	}
	var victims []string
	waitFor(b, "every tenant served, half on each node", func() error {
		own, settled := owners(b, keys)
		if !settled {
			return fmt.Errorf("not settled")
		}
		// Each log is read once per look (the test process also runs etcd: reading every
		// log once per tenant starved it enough for the nodes to lose their leases).
		listening := map[string]map[string]bool{"na": listeningTenants(na), "nb": listeningTenants(nb)}
		victims = victims[:0]
		for tn, o := range own {
			if !listening[o][tn] {
				return fmt.Errorf("%s not listening on %s", tn, o)
			}
			if o == "na" {
				victims = append(victims, tn)
			}
		}
		// Both nodes in the placement (one that lost its lease is not, until it is back).
		if d := len(own) - 2*len(victims); n > 1 && (d > 1 || d < -1) {
			return fmt.Errorf("na owns %d of %d", len(victims), len(own))
		}
		return nil
	})
	victim, survivor := na, nb
	if len(victims) == 0 { // everything on nb: kill it instead
		victim, survivor = nb, na
		for i := range n {
			victims = append(victims, fmt.Sprintf("t%d", i))
		}
	}
	// The survivor's hot standby (the victim's images open without their locks) is part of
	// the steady state the failover starts from: a node that has just joined, or a tenant
	// just added, is not covered until its standby pass ends.
	waitFor(b, survivor.name+"'s standby for the victim's tenants", func() error {
		if !standby {
			return nil
		}
		if tenants, missing, ok := standbyState(survivor); !ok || tenants != len(victims) || missing != 0 {
			return fmt.Errorf("standby: %d tenants, %d images missing (%v), want %d tenants", tenants, missing, ok, len(victims))
		}
		return nil
	})
	swFd, err := unix.Open("/run/netns/"+sw, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(swFd)
	// The initiators reach every victim before the kill, as they would with sessions open:
	// their ARP caches hold the victim's interfaces, which the survivor's gratuitous ARPs
	// must replace.
	if _, err := probeAll(swFd, victims, time.Now().Add(patience)); err != nil {
		b.Fatalf("before the kill: %v", err)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.URL}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	nodeKey := keys + "/nodes/" + victim.name
	cur, err := cli.Get(context.Background(), nodeKey)
	if err != nil || len(cur.Kvs) != 1 {
		b.Fatalf("victim's node key %s: %v %v", nodeKey, err, cur)
	}
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	expired := make(chan time.Time, 1)
	wch := cli.Watch(wctx, nodeKey, clientv3.WithRev(cur.Header.Revision+1))
	go func() {
		for wr := range wch {
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					expired <- time.Now()
					return
				}
			}
		}
	}()

	if out := os.Getenv("NSTARGET_FAILOVER_PERF"); out != "" { // profile the survivor's takeover
		perf := exec.Command("perf", "record", "-g", "-F", "999", "-p", strconv.Itoa(survivor.cmd.Process.Pid),
			"-o", fmt.Sprintf("%s/%d-%d.perf", out, n, k), "--", "sleep", "6")
		if err := perf.Start(); err != nil {
			b.Fatal(err)
		}
		defer perf.Wait()
		time.Sleep(300 * time.Millisecond)
	}
	t0 := time.Now()
	victim.signal(syscall.SIGKILL)
	<-victim.done
	run(b, "ip", "link", "set", victim.up, "down") // the machine is gone, its links with it
	served, err := probeAll(swFd, victims, time.Now().Add(patience))
	if err != nil {
		b.Fatalf("after the kill: %v", err)
	}
	var tExp time.Time
	select {
	case tExp = <-expired:
	case <-time.After(patience):
		b.Fatal("the victim's node key was never deleted")
	}
	r := failoverResult{moved: len(victims), toExpiry: tExp.Sub(t0), firstAfterExpiry: time.Duration(1<<63 - 1)}
	for _, s := range served {
		r.toServe = max(r.toServe, s.accepted.Sub(t0))
		r.afterExpiry = max(r.afterExpiry, s.accepted.Sub(tExp))
		r.firstAfterExpiry = min(r.firstAfterExpiry, s.accepted.Sub(tExp))
		r.loginAfterExpiry = max(r.loginAfterExpiry, s.loggedIn.Sub(tExp))
	}
	r.phases = takeoverPhases(survivor, tExp)
	survivor.stop()
	if d := os.Getenv("NSTARGET_FAILOVER_LOGS"); d != "" { // the nodes' logs, to study a round
		for _, nd := range []*node{victim, survivor} {
			f := fmt.Sprintf("%s/%d-%d-%s.log", d, n, k, nd.name)
			if err := os.WriteFile(f, []byte(fmt.Sprintf("killed at %s, expiry seen at %s\n%s\n", t0.Format(time.RFC3339Nano), tExp.Format(time.RFC3339Nano), nd.log())), 0o644); err != nil {
				b.Log(err)
			}
		}
	}
	return r
}

// listeningTenants is the tenants node's current run has logged "tenant listening" for.
func listeningTenants(n *node) map[string]bool {
	out := map[string]bool{}
	cur := fmt.Sprintf("[%d] ", n.starts)
	for l := range strings.SplitSeq(n.log(), "\n") {
		rest, ok := strings.CutPrefix(l, cur)
		if !ok || !strings.Contains(rest, `"msg":"tenant listening"`) {
			continue
		}
		var m struct{ Tenant string }
		if json.Unmarshal([]byte(rest), &m) == nil && m.Tenant != "" {
			out[m.Tenant] = true
		}
	}
	return out
}

// ---- an initiator on the switch ----

type probeResult struct {
	accepted, loggedIn time.Time
}

// probeAll connects, from the switch namespace swFd, to the portal of every tenant (t<i>) until
// each accepts a TCP connection and lets an iSCSI session log in and out, or deadline passes.
//
// The connections are made by one OS thread inside the switch (a socket keeps the namespace it
// was created in), with non-blocking connects and epoll, so probing 300 tenants costs the
// machine little: the test process also runs etcd, and the nodes share its two cores. A try is
// abandoned after 100 ms (a SYN sent to an interface that is gone is simply lost) and made
// again at once; a refusal (the address is up, nothing listens yet) is tried again after 5 ms.
// Each accepted connection logs in on a goroutine of its own; a failed login (a listener
// being replaced) sends the tenant back to the connector.
func probeAll(swFd int, tenants []string, deadline time.Time) (map[string]probeResult, error) {
	type target struct {
		name     string
		sa       unix.SockaddrInet4
		iqn      string
		fd       int       // connecting socket; -1: none
		giveUp   time.Time // of the try in flight
		next     time.Time // of the next try
		accepted time.Time
		last     error
	}
	ts := make([]*target, len(tenants))
	for i, tn := range tenants {
		n, err := strconv.Atoi(strings.TrimPrefix(tn, "t"))
		if err != nil {
			return nil, fmt.Errorf("tenant %q: %w", tn, err)
		}
		t := &target{name: tn, iqn: fmt.Sprintf("iqn.2026-12.org.nstarget:t%d", n), fd: -1}
		t.sa.Port = 3260
		t.sa.Addr = netip.MustParseAddr(tenantAddr(n)).As4()
		ts[i] = t
	}
	type loginDone struct {
		t   *target
		at  time.Time
		err error
	}
	logins := make(chan loginDone, len(ts))
	out := make(map[string]probeResult, len(ts))
	errc := make(chan error, 1)
	go func() {
		// The thread goes back to its own namespace and lives on. It must not end with the
		// goroutine (a goroutine that exits locked takes its thread with it): tests/cephtest
		// starts the Ceph daemons with Pdeathsig, which the kernel fires when the *thread*
		// that forked them exits, and any thread may have been that one. Ending it killed
		// the OSD and monitor in the middle of a failover now and then: every Ceph call of
		// the survivor then timed out.
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("own namespace: %w", err)
			runtime.UnlockOSThread()
			return
		}
		defer func() {
			if unix.Setns(home, unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			} // else it stays locked and ends, still in the switch: never reused there
			unix.Close(home)
		}()
		errc <- func() error {
			if err := unix.Setns(swFd, unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("setns: %w", err)
			}
			ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
			if err != nil {
				return err
			}
			defer unix.Close(ep)
			pending := len(ts) // not yet logged in
			inLogin := 0
			evs := make([]unix.EpollEvent, 64)
			for pending > 0 {
				now := time.Now()
				if now.After(deadline) {
					var errs []error
					for _, t := range ts {
						if t.fd >= 0 {
							unix.Close(t.fd)
						}
						if out[t.name].loggedIn.IsZero() {
							errs = append(errs, fmt.Errorf("%s: not served by the deadline: %v", t.name, t.last))
						}
					}
					return errors.Join(errs...)
				}
				for i, t := range ts {
					if !t.accepted.IsZero() || t.fd >= 0 || now.Before(t.next) {
						if t.fd >= 0 && now.After(t.giveUp) {
							unix.Close(t.fd)
							t.fd, t.last = -1, errors.New("no answer within 100 ms")
						}
						continue
					}
					fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
					if err != nil {
						return err
					}
					err = unix.Connect(fd, &t.sa)
					if err != nil && !errors.Is(err, unix.EINPROGRESS) {
						unix.Close(fd)
						t.last, t.next = err, now.Add(5*time.Millisecond)
						continue
					}
					if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLOUT, Fd: int32(i)}); err != nil {
						unix.Close(fd)
						return err
					}
					t.fd, t.giveUp = fd, now.Add(100*time.Millisecond)
				}
				n, err := unix.EpollWait(ep, evs, 2)
				if err != nil && !errors.Is(err, unix.EINTR) {
					return err
				}
				for _, ev := range evs[:max(n, 0)] {
					t := ts[ev.Fd]
					if t.fd < 0 {
						continue
					}
					fd := t.fd
					t.fd = -1
					unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, fd, nil)
					soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
					if err == nil && soerr != 0 {
						err = unix.Errno(soerr)
					}
					if err != nil {
						unix.Close(fd)
						t.last, t.next = err, time.Now().Add(5*time.Millisecond)
						continue
					}
					t.accepted = time.Now()
					inLogin++
					go func() {
						f := os.NewFile(uintptr(fd), t.name)
						c, err := net.FileConn(f)
						f.Close()
						if err == nil {
							c.SetDeadline(time.Now().Add(10 * time.Second))
							err = iscsiLoginLogout(c, t.iqn)
							c.Close()
						}
						logins <- loginDone{t, time.Now(), err}
					}()
				}
				for drained := false; !drained; {
					select {
					case d := <-logins:
						inLogin--
						if d.err != nil {
							d.t.last, d.t.next = d.err, time.Now().Add(5*time.Millisecond)
							if _, ok := out[d.t.name]; !ok {
								// keep the first acceptance: the portal was reachable then
								out[d.t.name] = probeResult{accepted: d.t.accepted}
							}
							d.t.accepted = time.Time{}
							continue
						}
						r := out[d.t.name]
						if r.accepted.IsZero() {
							r.accepted = d.t.accepted
						}
						r.loggedIn = d.at
						out[d.t.name] = r
						pending--
					default:
						drained = true
					}
				}
			}
			return nil
		}()
	}()
	err := <-errc
	return out, err
}

// iscsiLoginLogout logs in to iqn over c (AuthMethod=None, a normal session) and out again:
// the least an initiator does before its first command.
func iscsiLoginLogout(c net.Conn, iqn string) error {
	rw := bufio.NewReadWriter(bufio.NewReader(c), bufio.NewWriter(c))
	var cmdSN uint32 = 1
	step := func(csg, nsg byte, keys ...string) error {
		var h [48]byte
		h[0] = 0x03 | 0x40         // login request, immediate
		h[1] = 0x80 | csg<<2 | nsg // transit
		copy(h[8:14], []byte{0x80, 0, 0, 0x4e, 0x53, 0x54})
		binary.BigEndian.PutUint32(h[16:], 1) // ITT
		binary.BigEndian.PutUint32(h[24:], cmdSN)
		data := []byte(strings.Join(keys, "\x00") + "\x00")
		if err := writePDU(rw, h, data); err != nil {
			return err
		}
		r, _, err := readPDU(rw)
		if err != nil {
			return err
		}
		if r[0]&0x3f != 0x23 {
			return fmt.Errorf("want a login response, got opcode 0x%02x", r[0]&0x3f)
		}
		if st := binary.BigEndian.Uint16(r[36:]); st != 0 {
			return fmt.Errorf("login refused: status 0x%04x", st)
		}
		if r[1]&0x80 == 0 || r[1]&3 != nsg {
			return fmt.Errorf("target did not move to stage %d (flags 0x%02x)", nsg, r[1])
		}
		return nil
	}
	if err := step(0, 1, "InitiatorName=iqn.2026-12.org.nstarget:bench", "AuthMethod=None", "SessionType=Normal", "TargetName="+iqn); err != nil {
		return fmt.Errorf("login, security stage: %w", err)
	}
	if err := step(1, 3, "HeaderDigest=None", "DataDigest=None", "ErrorRecoveryLevel=0", "MaxRecvDataSegmentLength=262144"); err != nil {
		return fmt.Errorf("login, operational stage: %w", err)
	}
	var h [48]byte
	h[0] = 0x06 | 0x40 // logout request, immediate
	h[1] = 0x80        // close the session
	binary.BigEndian.PutUint32(h[16:], 2)
	binary.BigEndian.PutUint32(h[24:], cmdSN)
	if err := writePDU(rw, h, nil); err != nil {
		return err
	}
	for {
		r, _, err := readPDU(rw)
		if err != nil {
			return fmt.Errorf("logout: %w", err)
		}
		if r[0]&0x3f == 0x26 {
			if r[2] != 0 {
				return fmt.Errorf("logout response %d", r[2])
			}
			return nil
		}
	}
}

func writePDU(rw *bufio.ReadWriter, h [48]byte, data []byte) error {
	h[5], h[6], h[7] = byte(len(data)>>16), byte(len(data)>>8), byte(len(data))
	rw.Write(h[:])
	rw.Write(data)
	rw.Write(make([]byte, (4-len(data)%4)%4))
	return rw.Flush()
}

func readPDU(r io.Reader) ([48]byte, []byte, error) {
	var h [48]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return h, nil, err
	}
	n := int(h[5])<<16 | int(h[6])<<8 | int(h[7])
	if n > 1<<20 {
		return h, nil, fmt.Errorf("data segment of %d bytes", n)
	}
	buf := make([]byte, int(h[4])*4+n+(4-n%4)%4)
	if _, err := io.ReadFull(r, buf); err != nil {
		return h, nil, err
	}
	return h, buf[int(h[4])*4:][:n], nil
}
