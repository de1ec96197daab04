package cluster_test

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"nstarget/cluster"
)

// TestLibiscsiAndOpenISCSIWritersFollowTheirTenantAcrossNodeFailuresWithEveryAcknowledgedWriteIntact:
// three nodes share four tenants. Two initiators write to tenant t0's LUN, each to its own range:
// libiscsi (an interactive qemu-io in the switch namespace) and open-iscsi (iscsid and the
// kernel's iscsi_tcp in a qemu guest whose tap is a port of the switch's bridge, writing numbered
// blocks with O_DIRECT and fsync). They keep writing while t0's owner is drained (SIGTERM: a
// planned move, no fencing), frozen (SIGSTOP), cut off from etcd (a partition) and killed
// (SIGKILL). Each time another node takes t0 over, fences the old owner's image, brings t0's
// address up on its own uplink and serves; both initiators reconnect to the same address and
// go on: before the old owner is repaired, the new owner shows the guest's session writing
// through it (`nstarget status`) and the guest sees writes acknowledged. The frozen owner,
// resumed, stops serving and never writes again. At the end every write either initiator had
// acknowledged reads back: qemu-io's slots here, the guest's numbered blocks in the guest (a
// block lost or stale fails its verdict), and every connection open-iscsi made went to t0's
// address.
func TestLibiscsiAndOpenISCSIWritersFollowTheirTenantAcrossNodeFailuresWithEveryAcknowledgedWriteIntact(t *testing.T) {
	const tenants = 4
	dir := t.TempDir()
	sockDir, err := os.MkdirTemp("", "nc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sw := makeSwitch(t)
	// The guest boots while the cluster comes up; it logs in once told t0 is served. Its
	// numbered blocks fill 1 MiB from 8 MiB on, away from qemu-io's first MiB.
	g := bootWriterGuest(t, sw, tenantAddr(0)+":3260", "iqn.2026-12.org.nstarget:t0", 2048, 256)
	keys := fmt.Sprintf("/%s-%d", prefix, seq.Add(1))
	nodes := map[string]*node{}
	for i, name := range []string{"na", "nb", "nc"} {
		up := fmt.Sprintf("%su%d", prefix, i)
		uplink(t, sw, up)
		nodes[name] = newNode(t, dir, sockDir, keys, name, up)
		nodes[name].start()
	}
	doc := dir + "/tenants.toml"
	if err := os.WriteFile(doc, []byte(tenantsDoc(tenants)), 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, bin, "cluster", "apply", "-c", doc, "-endpoints", etcd.URL, "-prefix", keys)

	// owner waits until t0 is owned by a node other than not, serving, and returns it; with
	// settled, also until no tenant has a move pending.
	owner := func(what, not string, settled bool) *node {
		t.Helper()
		var o *node
		waitFor(t, what, func() error {
			own, done := owners(t, keys)
			if settled && !done {
				return fmt.Errorf("moves pending: %v", own)
			}
			n := nodes[own["t0"]]
			if n == nil || n.name == not {
				return fmt.Errorf("t0 owned by %q", own["t0"])
			}
			if n.count("tenant taken over", "t0") == 0 || n.count("tenant listening", "t0") == 0 {
				return fmt.Errorf("%s does not serve t0 yet", n.name)
			}
			o = n
			return nil
		})
		return o
	}
	owner("every tenant owned where it is placed", "", true)
	for i := range tenants {
		waitFor(t, fmt.Sprintf("tenant t%d served on its address", i), func() error {
			out, err := exec.Command("ip", "netns", "exec", sw, "iscsi-ls", "-s", "iscsi://"+tenantAddr(i)).CombinedOutput()
			if err != nil || !strings.Contains(string(out), fmt.Sprintf("iqn.2026-12.org.nstarget:t%d", i)) || !strings.Contains(string(out), "Lun:0") {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}

	if _, _, err := g.WaitLine("E2E-WAITING", patience); err != nil {
		t.Fatal(err)
	}
	if err := g.Send("go"); err != nil {
		t.Fatal(err)
	}

	// The writer: slot k of 16 (64 KiB each) is rewritten with pattern gen; acked[k] is the
	// last pattern the target acknowledged for it.
	q := startQIO(t, sw, "iscsi://"+tenantAddr(0)+"/iqn.2026-12.org.nstarget:t0/0")
	acked := make([]int, 16)
	gen := 0
	write := func(n int) {
		t.Helper()
		for range n {
			gen++
			k, pat := gen%len(acked), gen%250+1
			if err := q.Do(fmt.Sprintf("write -P %d %dk 64k", pat, k*64)); err != nil {
				t.Fatalf("write %d: %v", gen, err)
			}
			acked[k] = pat
		}
	}
	write(16)
	if _, at, err := g.WaitLine("E2E-IO-RUNNING", patience); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("open-iscsi guest writing %.1fs after its boot", at.Seconds())
	}

	faults := []struct {
		name          string
		do, undo      func(n *node)
		fenceExpected bool
	}{
		{"drain (SIGTERM)", func(n *node) { n.stop() }, func(n *node) { n.start() }, false},
		{"freeze (SIGSTOP)", func(n *node) { n.signal(syscall.SIGSTOP) }, func(n *node) { n.signal(syscall.SIGCONT) }, true},
		// Cut off from etcd but not from Ceph, the owner notices before its lease can expire
		// and lets go of its images itself: nobody needs fencing.
		{"partition from etcd", func(n *node) { n.proxy.cut.Store(true) }, func(n *node) { n.proxy.heal() }, false},
		// A crashed machine takes its links down with it; a killed process alone would leave
		// its tenants' addresses up in their namespaces.
		{"crash (SIGKILL)", func(n *node) {
			n.signal(syscall.SIGKILL)
			<-n.done
			run(t, "ip", "link", "set", n.up, "down")
		}, func(n *node) {
			run(t, "ip", "link", "set", n.up, "up")
			n.start()
		}, true},
	}
	for _, f := range faults {
		// After the previous fault's repair the placement may move t0 back (a planned move):
		// fault the owner the cluster has settled on.
		cur := owner("the cluster to settle before "+f.name, "", true)
		blocklisted := blocklistCount(t)
		// The guest is logged in to cur too, and writing through it.
		waitFor(t, "the open-iscsi guest to write through "+cur.name, func() error {
			if w, _, ok := cur.session("t0", guestInitiator); !ok || w == 0 {
				return fmt.Errorf("%s shows no session of %s on t0 that wrote (%d bytes)", cur.name, guestInitiator, w)
			}
			return nil
		})
		// Every node stands by for the tenants it would get (the images open, unlocked), so
		// a takeover below is from a pre-opened image: its fencing is what is checked.
		waitStandby(t, nodes, tenants)
		t0 := time.Now()
		f.do(cur)
		next := owner("t0 taken over after "+f.name+" of "+cur.name, cur.name, false)
		took := time.Since(t0)
		if f.fenceExpected && standby {
			// The image was taken over from the standby handle (opened before the fault,
			// without the lock), and still fenced: the old owner's blocklisting is checked
			// below, its writes never landing by the guest's and qemu-io's read-backs.
			if c := next.countRaw("rbd: fenced the previous lock holder", "image="+prefix+"-t0 ", "standby=true"); c == 0 {
				t.Errorf("%s: %s fenced t0's image, but not from its standby handle", f.name, next.name)
			}
		}
		write(8) // the same session, reconnected to the same address on another node
		t.Logf("%s of %s: %s serves t0 after %.2fs; qemu-io went on (%d writes in all)", f.name, cur.name, next.name, took.Seconds(), gen)
		// The guest follows too, before the old owner is repaired (which may move t0 back):
		// open-iscsi logs in to next at t0's address and writes through it, and the guest sees
		// writes acknowledged after that.
		var since time.Time
		waitFor(t, "the open-iscsi guest to write through "+next.name, func() error {
			w, s, ok := next.session("t0", guestInitiator)
			if !ok || w < 3*4096 {
				return fmt.Errorf("%s shows no session of %s on t0 that wrote 3 blocks (%d bytes)", next.name, guestInitiator, w)
			}
			since = s
			return nil
		})
		if _, _, _, err := g.WaitLineFrom(len(g.Lines()), "E2E-ACK ", patience); err != nil {
			t.Fatalf("%s: the open-iscsi guest wrote through %s but saw no write acknowledged: %v", f.name, next.name, err)
		}
		t.Logf("%s: open-iscsi logged in to %s %.2fs after the fault and went on writing", f.name, next.name, since.Sub(t0).Seconds())
		switch f.name {
		case "freeze (SIGSTOP)", "partition from etcd":
			// The old owner, back, must notice it lost its lease and stop serving.
			f.undo(cur)
			old := cur
			waitFor(t, old.name+" to stop serving t0", func() error {
				if _, err := os.Stat(fmt.Sprintf("%s/%s-netns/t0", dir, old.name)); err == nil {
					return fmt.Errorf("%s still has t0's namespace", old.name)
				}
				return nil
			})
		default:
			f.undo(cur)
		}
		if got := blocklistCount(t) > blocklisted; got != f.fenceExpected {
			out, _ := ceph.Ceph("osd", "blocklist", "ls")
			t.Errorf("%s: old owner blocklisted = %v, want %v; blocklist:\n%s", f.name, got, f.fenceExpected, out)
		}
		write(8)
	}
	if err := g.Send("stop"); err != nil {
		t.Fatal(err)
	}
	for k, pat := range acked {
		if pat == 0 {
			continue
		}
		if err := q.Do(fmt.Sprintf("read -P %d %dk 64k", pat, k*64)); err != nil {
			t.Fatalf("slot %d lost its last acknowledged write (pattern %d): %v", k, pat, err)
		}
	}
	// The guest reads its slots back and says whether each holds its last acknowledged write.
	pass, summary := g.Result(patience)
	if !pass {
		t.Fatalf("the open-iscsi guest failed: %s", summary)
	}
	acks, conns := 0, 0
	for _, l := range g.Lines() {
		switch {
		case strings.HasPrefix(l, "E2E-ACK "):
			acks++
		case strings.HasPrefix(l, "E2E-CONN "):
			// Every connection open-iscsi made went to t0's one address.
			conns++
			if !strings.Contains(l, " to "+tenantAddr(0)+":3260 ") {
				t.Errorf("the open-iscsi guest connected elsewhere than t0's address: %s", l)
			}
		}
	}
	t.Logf("open-iscsi guest: %d writes acknowledged over %d connections through %d faults, every one read back", acks, conns, len(faults))
}

// blocklistCount is how many clients Ceph has blocklisted: fencing adds one.
func blocklistCount(t *testing.T) int {
	t.Helper()
	out, err := ceph.Ceph("osd", "blocklist", "ls")
	if err != nil {
		t.Fatalf("ceph osd blocklist ls: %v", err)
	}
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, ":") && !strings.HasPrefix(l, "listed") {
			n++
		}
	}
	return n
}

// waitStandby waits until each running node's standby pass covers what cluster.Standby says it
// would get if another node died, every image open.
func waitStandby(t *testing.T, nodes map[string]*node, tenants int) {
	t.Helper()
	if !standby {
		return
	}
	var names, live []string
	for i := range tenants {
		names = append(names, fmt.Sprintf("t%d", i))
	}
	for name, n := range nodes {
		if n.cmd == nil {
			continue
		}
		select {
		case <-n.done:
		default:
			live = append(live, name)
		}
	}
	slices.Sort(live)
	for _, name := range live {
		want := len(cluster.Standby(names, live, name))
		waitFor(t, name+"'s standby", func() error {
			if got, missing, ok := standbyState(nodes[name]); !ok || got != want || missing != 0 {
				return fmt.Errorf("standby of %d tenants with %d images missing (%v), want %d tenants", got, missing, ok, want)
			}
			return nil
		})
	}
}
