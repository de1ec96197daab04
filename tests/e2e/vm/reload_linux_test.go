package vm_test

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A guest writes steadily to ext4 on its tenant's LUN while the host edits the config file and
// runs `nstarget reload` twelve times: tenants are added (in namespaces made for them) and removed
// again, another tenant's allow-list flips between two initiators, a third tenant's volume grows,
// and the writer's own LUN grows from 64 to 96 MiB. The writer's session is never logged in again
// and sees no connection error, every checksum verifies, each added tenant is served, each removed
// one refuses connections, each change of the others shows from outside, and after the host says
// "rescan" the guest's kernel sees its disk at the new size.
func TestLiveReloadsLeaveAWritersSessionAloneAndItSeesItsGrownLUNAfterRescan(t *testing.T) {
	if os.Getenv("NSTARGET_E2E_PEER") == "tgtd" {
		t.Skip("live reconfiguration is nstarget's (nstarget reload): the tgtd bring-up peer cannot reload")
	}
	t.Parallel()
	s := getSuite(t)
	const (
		aclIQN   = "iqn.2026-11.com.example:acl.db"
		growIQN  = "iqn.2026-11.com.example:grow.db"
		addedIQN = "iqn.2026-11.com.example:added.db"
		aclA     = "iqn.1993-08.org.debian:01:acl-a"
		aclB     = "iqn.1993-08.org.debian:01:acl-b"
		probe    = "iqn.1993-08.org.debian:01:probe" // the host's iscsi-ls where any initiator is allowed
		grown    = 96 << 20                          // the writer's LUN after its grow
	)
	// The configuration as it stands; every reload applies current() after one or two edits.
	writerSize, growSize, aclAllowed := int64(volumeSize), int64(16<<20), aclA
	var added []string // tenants added by a reload and not removed yet
	tenant := func(name, iqn string, initiators []string, size int64) tenantSpec {
		return tenantSpec{name: name, ns: s.nsName("rl-" + name), targets: []targetSpec{{iqn: iqn, initiators: initiators,
			luns: []lunSpec{{id: 0, volume: "rl-" + name, size: size}}}}}
	}
	current := func() []tenantSpec {
		ts := []tenantSpec{tenant("writer", sharedIQN, nil, writerSize), tenant("acl", aclIQN, []string{aclAllowed}, 16<<20),
			tenant("grow", growIQN, nil, growSize)}
		for _, name := range added {
			ts = append(ts, tenant(name, addedIQN, nil, 8<<20))
		}
		return ts
	}
	tenants := current()
	for _, tn := range tenants {
		addNetns(t, tn.ns)
	}
	writerNS, aclNS, growNS := tenants[0].ns, tenants[1].ns, tenants[2].ns
	srv := newServer(t, s, tenants).(*nstargetServer)
	srv.start(t)
	seconds := steadySeconds(t)
	g := s.bootGuests(t, guestSpec{name: "writer", ns: writerNS, script: "io-steady.sh",
		params: map[string]string{"iname": host1, "iqn": sharedIQN, "seconds": strconv.Itoa(seconds)}})[0]
	if _, at, err := g.WaitLine("E2E-IO-RUNNING", guestBudget); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("guest writing at %.1fs; reloading %s", at.Seconds(), srv.name())
	}

	// Each step edits the configuration, reloads, checks what reload says it changed (and that it
	// never names the writer's tenant but for its own grow), then checks the change from outside.
	var (
		step       int
		toAdd      []string // added by this step
		toRemove   []string // removed by this step
		want       []string // lines reload must print
		writerLine string   // the one change of the writer's tenant reload may print
		nextAdd    = 1
	)
	addTenant := func() {
		name := fmt.Sprintf("add%d", nextAdd)
		nextAdd++
		addNetns(t, s.nsName("rl-"+name))
		added = append(added, name)
		toAdd = append(toAdd, name)
		want = append(want, fmt.Sprintf("tenant %s added", name))
	}
	removeTenant := func() {
		name := added[0]
		added = added[1:]
		toRemove = append(toRemove, name)
		want = append(want, fmt.Sprintf("tenant %s removed", name))
	}
	flipACL := func() {
		if aclAllowed == aclA {
			aclAllowed = aclB
		} else {
			aclAllowed = aclA
		}
		want = append(want, fmt.Sprintf("tenant acl: target %s: allow-list now 1 initiators", aclIQN))
	}
	growOther := func() {
		growSize += 8 << 20
		want = append(want, fmt.Sprintf("tenant grow: target %s: LUN 0: volume rl-grow grown to %d bytes", growIQN, growSize))
	}
	growWriter := func() {
		writerSize = grown
		writerLine = fmt.Sprintf("tenant writer: target %s: LUN 0: volume rl-writer grown to %d bytes", sharedIQN, writerSize)
		want = append(want, writerLine)
	}
	reload := func(edits ...func()) {
		t.Helper()
		step++
		toAdd, toRemove, want, writerLine = nil, nil, nil, ""
		aclBefore, growBefore := aclAllowed, growSize
		for _, edit := range edits {
			edit()
		}
		r0 := time.Now()
		out := srv.reconfigure(t, current())
		took := time.Since(r0)
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Fatalf("reload %d: output lacks %q:\n%s", step, w, out)
			}
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if strings.Contains(l, "tenant writer") && l != writerLine {
				t.Errorf("reload %d touched the writer's tenant: %s", step, l)
			}
		}
		t.Logf("reload %d in %.2fs: %s", step, took.Seconds(), strings.ReplaceAll(strings.TrimSpace(out), "\n", " | "))

		c0 := time.Now()
		var seen []string
		for _, name := range toAdd {
			out, err := waitDiscovery(s.nsName("rl-"+name), probe, addedIQN, patience)
			if err != nil {
				t.Fatalf("reload %d: added tenant %s not served: %v", step, name, err)
			}
			seen = append(seen, fmt.Sprintf("%s served (%s)", name, strings.Join(strings.Fields(out), " ")))
		}
		for _, name := range toRemove {
			out, err := waitGone(s.nsName("rl-"+name), probe, patience)
			if err != nil {
				t.Fatalf("reload %d: removed tenant %s: %v", step, name, err)
			}
			seen = append(seen, fmt.Sprintf("%s gone (portal refuses; iscsi-ls: %s)", name, out))
		}
		if aclAllowed != aclBefore {
			if _, err := waitDiscovery(aclNS, aclAllowed, aclIQN, patience); err != nil {
				t.Fatalf("reload %d: %s, now on acl's allow-list, is not served: %v", step, aclAllowed, err)
			}
			// SetInitiators has applied when reload returns: the one taken off is refused now.
			out, _ := exec.Command("ip", "netns", "exec", aclNS, "iscsi-ls", "-s", "-i", aclBefore, "iscsi://"+targetAddr).CombinedOutput()
			if strings.Contains(string(out), aclIQN) {
				t.Fatalf("reload %d: %s, taken off acl's allow-list, still sees the target:\n%s", step, aclBefore, out)
			}
			seen = append(seen, fmt.Sprintf("acl serves %s, not %s", aclAllowed, aclBefore))
		}
		if growSize != growBefore {
			size, err := readCapacity(growNS, probe, growIQN)
			if err != nil {
				t.Fatalf("reload %d: %v", step, err)
			}
			if size != growSize {
				t.Fatalf("reload %d: grow's LUN 0 reports %d bytes, want %d", step, size, growSize)
			}
			seen = append(seen, fmt.Sprintf("grow's LUN 0 reports %d bytes", size))
		}
		if len(seen) > 0 {
			t.Logf("reload %d checked in %.2fs: %s", step, time.Since(c0).Seconds(), strings.Join(seen, "; "))
		}
	}

	t0 := time.Now()
	reload(addTenant)
	reload(flipACL)
	reload(growOther)
	reload(addTenant, removeTenant)
	reload(flipACL, growOther)
	reload(growWriter)
	// The guest rescans while the reloads go on.
	if err := g.Send("rescan"); err != nil {
		t.Fatal(err)
	}
	reload(addTenant, removeTenant)
	reload(flipACL)
	reload(growOther)
	reload(removeTenant, addTenant)
	reload(flipACL, growOther)
	reload(removeTenant)
	t.Logf("%d reloads and their checks in %.2fs", step, time.Since(t0).Seconds())

	line, at, err := g.WaitLine("E2E-SIZE ", patience)
	if err != nil {
		t.Fatal(err)
	}
	f := append(strings.Fields(line), "")
	if size, err := strconv.ParseInt(f[1], 10, 64); err != nil || size != grown {
		t.Errorf("after the rescan the guest sees %q bytes, want %d (%s)", f[1], grown, line)
	} else {
		t.Logf("guest at %.1fs: %s", at.Seconds(), line)
	}
	for _, l := range g.Lines() {
		if strings.HasPrefix(l, "E2E-DMESG ") {
			t.Logf("guest kernel: %s", strings.TrimPrefix(l, "E2E-DMESG "))
		}
	}

	if err := g.Send("stop"); err != nil {
		t.Error(err)
	}
	if pass, _ := g.Result(time.Duration(seconds)*time.Second + guestBudget); !pass {
		t.Fatalf("guest %s failed (summary above)", g.Name())
	}
	srv.stop(t)
	// The server's side of the same story: the writer logged in once and never again.
	logs, err := os.ReadFile(srv.logPath)
	if err != nil {
		t.Fatal(err)
	}
	logins := 0
	for _, l := range strings.Split(string(logs), "\n") {
		if strings.Contains(l, "msg=login ") && strings.Contains(l, " tenant=writer ") && strings.Contains(l, "session=normal") {
			logins++
		}
	}
	if logins != 1 {
		t.Errorf("nstarget logged %d normal logins of tenant writer, want 1", logins)
	}
}

// waitGone waits until nothing accepts on the portal inside ns (a removed tenant's listener closes
// in the background), then checks that iscsi-ls fails there too and returns its complaint.
func waitGone(ns, initiator string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for exec.Command("ip", "netns", "exec", ns, "bash", "-c", "exec 3<>/dev/tcp/"+targetAddr+"/3260").Run() == nil {
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s still accepts in namespace %s after %v", portal, ns, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, err := exec.Command("ip", "netns", "exec", ns, "iscsi-ls", "-s", "-i", initiator, "iscsi://"+targetAddr).CombinedOutput()
	if err == nil {
		return "", fmt.Errorf("iscsi-ls in %s succeeded after the portal refused:\n%s", ns, out)
	}
	return strings.Join(strings.Fields(string(out)), " "), nil
}

// readCapacity asks LUN 0 of iqn inside ns for its size in bytes (READ CAPACITY(16), libiscsi).
func readCapacity(ns, initiator, iqn string) (int64, error) {
	out, err := exec.Command("ip", "netns", "exec", ns, "iscsi-readcapacity16", "-s", "-i", initiator,
		"iscsi://"+targetAddr+"/"+iqn+"/0").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("iscsi-readcapacity16 in %s: %v: %s", ns, err, out)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("iscsi-readcapacity16 in %s: %q is not a size", ns, out)
	}
	return n, nil
}
