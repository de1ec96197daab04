//go:build linux

package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"nstarget/fleet"
	"nstarget/tests/qemuio"
)

// reloadLoad is the configuration the reload-under-load test moves through: two busy tenants
// that never change, five "moved" tenants whose allow-lists and volume sizes change on every
// reload, and the churned tenants r-000.. that come and go.
type reloadLoad struct {
	sock, nsDir string
	live        []int   // churned tenants in the file now
	allowOnly   [5]bool // moved tenant i allows only iqn.2026-12.test:moved
	sizeMiB     [5]int  // moved tenant i's volume size
	busyAllow   bool    // busy-1 lists its own initiator explicitly
}

func (rl *reloadLoad) text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "[server]\nnetns_dir = %q\ndata_dir = \"@POOL@\"\ncontrol_socket = %q\npool_soft_threshold = 0\n", rl.nsDir, rl.sock)
	tenant := func(name, initiators string, sizeMiB int) {
		fmt.Fprintf(&b, "\n[[tenant]]\nname = %q\nnetns = \"@P@-%s\"\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n  iqn = \"iqn.2026-12.org.nstarget:%s\"\n",
			name, name, name)
		if initiators != "" {
			fmt.Fprintf(&b, "  initiators = [%s]\n", initiators)
		}
		fmt.Fprintf(&b, "    [[tenant.target.lun]]\n    volume = %q\n    size = \"%dMiB\"\n", name, sizeMiB)
	}
	tenant("busy-0", "", 16)
	busy1 := ""
	if rl.busyAllow {
		busy1 = `"iqn.2008-11.org.linux-kvm", "iqn.2026-12.test:other"`
	}
	tenant("busy-1", busy1, 16)
	for i := range rl.sizeMiB {
		allow := ""
		if rl.allowOnly[i] {
			allow = `"iqn.2026-12.test:moved"`
		}
		tenant(fmt.Sprintf("moved-%d", i), allow, rl.sizeMiB[i])
	}
	for _, i := range rl.live {
		tenant(fmt.Sprintf("r-%03d", i), "", 1)
	}
	return b.String()
}

// TestFiftyReloadsUnderLoadChangeOnlyWhatTheySay: while two libiscsi (qemu-io) sessions do
// verified I/O, 50 reloads add 200 tenants, remove 100 of them, flip allow-lists and grow
// volumes of other tenants, and re-list one busy tenant's own initiator. No I/O fails, each
// busy session keeps its TSIH and connection (one login each), every added tenant serves and
// every removed one is gone.
func TestFiftyReloadsUnderLoadChangeOnlyWhatTheySay(t *testing.T) {
	const reloads, addPer, churned, removedTotal = 50, 4, 200, 100
	dir := t.TempDir()
	rl := &reloadLoad{sock: filepath.Join(dir, "ctl.sock"), nsDir: filepath.Join(dir, "netns")}
	for i := range rl.sizeMiB {
		rl.sizeMiB[i] = 4
	}
	ns := func(name string) string { return prefix + "-" + name }
	var made []string
	t.Cleanup(func() {
		for _, n := range made {
			if err := fleet.Delete(rl.nsDir, n); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	mk := func(name string) {
		if _, err := fleet.Add(rl.nsDir, ns(name)); err != nil {
			t.Fatal(err)
		}
		made = append(made, ns(name))
	}
	mk("busy-0")
	mk("busy-1")
	for i := range rl.sizeMiB {
		mk(fmt.Sprintf("moved-%d", i))
	}
	for i := 0; i < churned; i++ {
		mk(fmt.Sprintf("r-%03d", i))
	}
	write := func() string { return writeConfig(t, dir, "c.toml", rl.text()) }
	s := startServe(t, write())
	s.listening(ns("busy-0"), 1)
	s.listening(ns("busy-1"), 1)

	// The load: each busy session rewrites and verifies its own 16 slots of 64 KiB, round
	// robin, until told to stop. done counts the verified rounds, so the test can wait for I/O
	// to have happened between reloads instead of hoping it did.
	type load struct {
		q    *qemuio.Session
		done atomic.Int64
		err  atomic.Pointer[error]
	}
	loads := make([]*load, 2)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for k := range loads {
		name := fmt.Sprintf("busy-%d", k)
		l := &load{q: startQIO(t, filepath.Join(rl.nsDir, ns(name)), "iscsi://127.0.0.1/iqn.2026-12.org.nstarget:"+name+"/0")}
		loads[k] = l
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				slot, pat := n%16, (n+k)%255+1
				err := l.q.Do(fmt.Sprintf("write -P %d %dk 64k", pat, slot*64))
				if err == nil {
					err = l.q.Do(fmt.Sprintf("read -P %d %dk 64k", pat, slot*64))
				}
				if err != nil {
					l.err.Store(&err)
					return
				}
				l.done.Add(1)
			}
		}()
	}
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	})
	// ioHappened waits until every busy session has verified one more round since mark.
	ioHappened := func(what string) {
		marks := make([]int64, len(loads))
		for k, l := range loads {
			marks[k] = l.done.Load()
		}
		waitFor(t, "busy I/O "+what, func() error {
			for k, l := range loads {
				if p := l.err.Load(); p != nil {
					t.Fatalf("busy-%d: I/O failed %s: %v", k, what, *p)
				}
				if l.done.Load() <= marks[k] {
					return fmt.Errorf("busy-%d has done no I/O yet", k)
				}
			}
			return nil
		})
	}
	ioHappened("before the reloads")
	tsih0 := make([]int, len(loads))
	for k := range loads {
		var err error
		if tsih0[k], _, _, err = sessionOf(t, rl.sock, fmt.Sprintf("busy-%d", k)); err != nil {
			t.Fatal(err)
		}
	}

	removed := 0
	for r := 1; r <= reloads; r++ {
		// Add the next addPer; remove the oldest ones added by earlier reloads, two at a time,
		// so that the last reload leaves removedTotal removed.
		var live []int
		lo := min(removedTotal, 2*r+2, addPer*(r-1))
		for i := lo; i < addPer*r; i++ {
			live = append(live, i)
		}
		removed = lo
		rl.live = live
		m := r % len(rl.sizeMiB)
		rl.allowOnly[m] = !rl.allowOnly[m]
		rl.sizeMiB[(r+2)%len(rl.sizeMiB)]++
		if r == reloads/2 {
			rl.busyAllow = true
		}
		write()
		code, out, errOut := runBin(t, "reload", "-socket", rl.sock)
		if code != 0 {
			t.Fatalf("reload %d: exit %d: %s%s", r, code, out, errOut)
		}
		if !strings.Contains(out, "grown") || !strings.Contains(out, "allow-list") {
			t.Fatalf("reload %d did not grow a volume and change an allow-list:\n%s", r, out)
		}
		if r%10 == 0 {
			ioHappened(fmt.Sprintf("after reload %d", r))
		}
	}
	ioHappened("after the last reload")
	close(stop)
	wg.Wait()
	for k, l := range loads {
		if p := l.err.Load(); p != nil {
			t.Fatalf("busy-%d: %v", k, *p)
		}
		name := fmt.Sprintf("busy-%d", k)
		if n := s.count(msgIs("login", "tenant", name, "session", "normal")); n != 1 {
			t.Fatalf("%s logged in %d times: a reload disturbed its session", name, n)
		}
		if tsih, _, _, err := sessionOf(t, rl.sock, name); err != nil || tsih != tsih0[k] {
			t.Fatalf("%s: TSIH %d -> %d (%v)", name, tsih0[k], tsih, err)
		}
		t.Logf("%s: %d verified rounds of 64 KiB through 50 reloads, one login", name, l.done.Load())
	}
	if removed != removedTotal || len(rl.live) != churned-removedTotal {
		t.Fatalf("the test removed %d and kept %d tenants, want %d and %d", removed, len(rl.live), removedTotal, churned-removedTotal)
	}

	// Every tenant still in the file serves; every one taken out is gone.
	var st statusJSON
	waitFor(t, "every added tenant serving", func() error {
		code, out, errOut := runBin(t, "status", "-socket", rl.sock, "-o", "json")
		if code != 0 {
			return fmt.Errorf("status: %s", errOut)
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return err
		}
		serving := 0
		for _, tn := range st.Tenants {
			if strings.HasPrefix(tn.Name, "r-") && tn.State == "serving" {
				serving++
			}
		}
		if serving != len(rl.live) {
			return fmt.Errorf("%d of %d churned tenants serving", serving, len(rl.live))
		}
		return nil
	})
	for _, tn := range st.Tenants {
		if strings.HasPrefix(tn.Name, "moved-") {
			var i int
			fmt.Sscanf(tn.Name, "moved-%d", &i)
			if got := tn.Targets[0].LUNs[0].Size; got != int64(rl.sizeMiB[i])<<20 {
				t.Fatalf("%s: volume size %d, want %d MiB", tn.Name, got, rl.sizeMiB[i])
			}
		}
	}
	for _, i := range rl.live {
		name := fmt.Sprintf("r-%03d", i)
		conns, err := dialIn(filepath.Join(rl.nsDir, ns(name)), "127.0.0.1:3260", 1)
		if err != nil {
			t.Fatalf("added tenant %s does not accept: %v", name, err)
		}
		conns[0].Close()
	}
	for _, i := range []int{rl.live[0], rl.live[len(rl.live)/2], rl.live[len(rl.live)-1]} {
		q := startQIO(t, filepath.Join(rl.nsDir, ns(fmt.Sprintf("r-%03d", i))), fmt.Sprintf("iscsi://127.0.0.1/iqn.2026-12.org.nstarget:r-%03d/0", i))
		if err := q.Do("write -P 7 0 4k"); err != nil {
			t.Fatalf("added tenant r-%03d: %v", i, err)
		}
	}
	for i := 0; i < removedTotal; i++ {
		name := fmt.Sprintf("r-%03d", i)
		if conns, err := dialIn(filepath.Join(rl.nsDir, ns(name)), "127.0.0.1:3260", 1); err == nil {
			conns[0].Close()
			t.Fatalf("removed tenant %s still accepts connections", name)
		}
	}
}
