package vm_test

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	sharedIQN   = "iqn.2026-11.com.example:shared.db"
	host1       = "iqn.1993-08.org.debian:01:host1"
	volumeSize  = 64 << 20
	guestBudget = 150 * time.Second // generous: `make test` runs other packages on the same 2 cores
	// replacementTimeout is how long open-iscsi may take to log in again after the target
	// restarts before it fails the I/O: a restart takes seconds, the rest is slack for a loaded
	// machine. The guest gives up on recovery a little later (e2e.max_seconds).
	replacementTimeout = 120
	recoveryBudget     = (replacementTimeout + 30) * time.Second
)

// steadySeconds is how long the steady writer writes at least (e2e.seconds): 10, or
// NSTARGET_E2E_SECONDS to make the guests write for longer.
func steadySeconds(t *testing.T) int {
	v := os.Getenv("NSTARGET_E2E_SECONDS")
	if v == "" {
		return 10
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("NSTARGET_E2E_SECONDS=%q: want a positive number of seconds", v)
	}
	return n
}

// Two tenants with identical addresses, identical target IQNs and identical initiator names: each
// guest reaches only its own tenant's volume through a full open-iscsi life cycle (discovery,
// login, mkfs.ext4, writes, logout, login again, fsck -n, checksums), and neither tenant's
// bytes ever land in the other's volume.
func TestTenantsWithIdenticalAddressesAndIQNsKeepTheirOwnData(t *testing.T) {
	t.Parallel()
	s := getSuite(t)
	tenants := []tenantSpec{
		{name: "acme", ns: s.nsName("acme"), targets: []targetSpec{{iqn: sharedIQN, initiators: []string{host1},
			luns: []lunSpec{{id: 0, volume: "acme-db", size: volumeSize}}}}},
		{name: "globex", ns: s.nsName("globex"), targets: []targetSpec{{iqn: sharedIQN, initiators: []string{host1},
			luns: []lunSpec{{id: 0, volume: "globex-db", size: volumeSize}}}}},
	}
	for _, tn := range tenants {
		addNetns(t, tn.ns)
	}
	srv := newServer(t, s, tenants)
	srv.start(t)

	data := map[string]*payload{}
	var specs []guestSpec
	for _, tn := range tenants {
		data[tn.name] = newPayload(t, 4)
		specs = append(specs, guestSpec{name: tn.name, ns: tn.ns, script: "fs-roundtrip.sh",
			params: map[string]string{"iname": host1, "iqn": sharedIQN}, data: data[tn.name].tar})
	}
	waitAll(t, s.bootGuests(t, specs...))
	srv.stop(t)

	// Host side: each volume holds its own tenant's file blocks and none of the other's.
	vols := map[string][]byte{}
	for _, tn := range tenants {
		b, err := os.ReadFile(srv.volumePath(t, tn.targets[0].luns[0].volume))
		if err != nil {
			t.Fatal(err)
		}
		vols[tn.name] = b
	}
	for owner, p := range data {
		for vol, b := range vols {
			n := p.blocksIn(b)
			switch {
			case vol == owner && n != len(p.blocks):
				t.Errorf("volume of %s holds %d of its %d written blocks", owner, n, len(p.blocks))
			case vol != owner && n != 0:
				t.Errorf("volume of %s holds %d blocks written by %s's guest", vol, n, owner)
			}
		}
	}
	if !t.Failed() {
		t.Logf("host check: each volume holds its own %d blocks and none of the other tenant's (%s)",
			len(data["acme"].blocks), srv.name())
	}
}

// An initiator that is not on the target's allow-list is refused at login (and gets no disk);
// the same guest with an allowed initiator name logs in.
func TestInitiatorNotOnAllowListIsRefusedAtLogin(t *testing.T) {
	t.Parallel()
	s := getSuite(t)
	const (
		allowed  = "iqn.1993-08.org.debian:01:allowed"
		intruder = "iqn.1993-08.org.debian:01:intruder"
		iqn      = "iqn.2026-11.com.example:acme.restricted"
	)
	tenants := []tenantSpec{{name: "acme", ns: s.nsName("acl"), targets: []targetSpec{{iqn: iqn,
		initiators: []string{allowed}, luns: []lunSpec{{id: 0, volume: "acme-restricted", size: volumeSize}}}}}}
	addNetns(t, tenants[0].ns)
	srv := newServer(t, s, tenants)
	srv.start(t)
	g := s.bootGuests(t, guestSpec{name: "intruder", ns: tenants[0].ns, script: "refused.sh",
		params: map[string]string{"iname": intruder, "allowed": allowed, "iqn": iqn}})[0]
	if pass, _ := g.Result(guestBudget); !pass {
		t.Fatalf("guest %s failed (summary above)", g.Name())
	}
	if !g.ConsoleHas("E2E-LOGIN-RC 24") {
		t.Logf("note: the refusal was not reported as an authorization failure (iscsiadm rc 24)")
	}
	srv.stop(t)
}

// nstarget is stopped with SIGTERM and started again while a guest is logged in and writing:
// open-iscsi notices, logs in again before the replacement timeout, the blocked writes complete
// without error, and the file system is clean with every file intact.
func TestTargetRestartDuringIOIsRecoveredByOpenISCSI(t *testing.T) {
	t.Parallel()
	s := getSuite(t)
	tenants := []tenantSpec{{name: "acme", ns: s.nsName("restart"), targets: []targetSpec{{iqn: sharedIQN,
		luns: []lunSpec{{id: 0, volume: "acme-restart", size: volumeSize}}}}}}
	addNetns(t, tenants[0].ns)
	srv := newServer(t, s, tenants)
	srv.start(t)
	g := s.bootGuests(t, guestSpec{name: "writer", ns: tenants[0].ns, script: "io-restart.sh",
		params: map[string]string{"iname": host1, "iqn": sharedIQN, "replacement_timeout": strconv.Itoa(replacementTimeout),
			"max_seconds": strconv.Itoa(int(recoveryBudget.Seconds()))}})[0]
	if _, at, err := g.WaitLine("E2E-IO-RUNNING", guestBudget); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("guest writing at %.1fs; restarting %s", at.Seconds(), srv.name())
	}
	t0 := time.Now()
	srv.stop(t)
	stopped := time.Since(t0)
	srv.start(t)
	t.Logf("%s stopped in %.2fs, serving again after %.2fs", srv.name(), stopped.Seconds(), time.Since(t0).Seconds())
	if pass, _ := g.Result(recoveryBudget + guestBudget); !pass {
		t.Fatalf("guest %s failed (summary above)", g.Name())
	}
	if line, _, err := g.WaitLine("E2E-RECOVERED", time.Second); err == nil {
		t.Logf("%s", line)
	}
	srv.stop(t)
}

// A guest writes steadily to its tenant while another tenant's namespace is deleted and created
// again, three times: the writer's session never fails and no write errors, and the other tenant
// is served again in its new namespace. The guest writes until the host says the churn is over
// (and for at least e2e.seconds), so the churn never outlasts the writes however slow it is.
func TestNamespaceChurnOfAnotherTenantDoesNotDisturbWriter(t *testing.T) {
	t.Parallel()
	s := getSuite(t)
	const victimIQN = "iqn.2026-11.com.example:victim.db"
	victimInit := "iqn.1993-08.org.debian:01:victim"
	tenants := []tenantSpec{
		{name: "writer", ns: s.nsName("writer"), targets: []targetSpec{{iqn: sharedIQN,
			luns: []lunSpec{{id: 0, volume: "writer-db", size: volumeSize}}}}},
		{name: "victim", ns: s.nsName("victim"), targets: []targetSpec{{iqn: victimIQN,
			luns: []lunSpec{{id: 0, volume: "victim-db", size: volumeSize}}}}},
	}
	for _, tn := range tenants {
		addNetns(t, tn.ns)
	}
	victimNS := tenants[1].ns
	srv := newServer(t, s, tenants)
	srv.start(t)
	seconds := steadySeconds(t)
	g := s.bootGuests(t, guestSpec{name: "writer", ns: tenants[0].ns, script: "io-steady.sh",
		params: map[string]string{"iname": host1, "iqn": sharedIQN, "seconds": strconv.Itoa(seconds)}})[0]
	if _, at, err := g.WaitLine("E2E-IO-RUNNING", guestBudget); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("guest writing at %.1fs; churning namespace %s", at.Seconds(), victimNS)
	}
	for cycle := 1; cycle <= 3; cycle++ {
		c0 := time.Now()
		run(t, "ip", "netns", "del", victimNS)
		// Re-created only once the server has dropped the old one, so every cycle takes the
		// offline-then-online path (re-creating at once could be seen as a replacement instead).
		srv.dropped(t, "victim", cycle)
		run(t, "ip", "netns", "add", victimNS)
		setupNetns(t, victimNS)
		srv.recreated(t, "victim")
		out, err := waitDiscovery(victimNS, victimInit, victimIQN, patience)
		if err != nil {
			t.Errorf("cycle %d: tenant victim not served in its re-created namespace: %v", cycle, err)
			break
		}
		t.Logf("cycle %d: %s deleted and re-created, served again after %.2fs (%s)", cycle, victimNS,
			time.Since(c0).Seconds(), strings.Join(strings.Fields(out), " "))
	}
	if err := g.Send("stop"); err != nil {
		t.Error(err)
	}
	if pass, _ := g.Result(time.Duration(seconds)*time.Second + guestBudget); !pass {
		t.Fatalf("guest %s failed (summary above)", g.Name())
	}
	srv.stop(t)
}

// waitDiscovery runs libiscsi's iscsi-ls inside ns until it lists iqn (login to its LUNs included).
func waitDiscovery(ns, initiator, iqn string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		out, err := exec.Command("ip", "netns", "exec", ns, "iscsi-ls", "-s", "-i", initiator,
			"iscsi://"+targetAddr).CombinedOutput()
		if err == nil && strings.Contains(string(out), iqn) && strings.Contains(string(out), "Lun:0") {
			return string(out), nil
		}
		if time.Now().After(deadline) {
			return string(out), fmt.Errorf("iscsi-ls in %s: %v: %s", ns, err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitAll waits for every guest's verdict (they run in parallel) and fails for each that failed.
func waitAll(t *testing.T, guests []*guest) {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	for _, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if pass, _ := g.Result(guestBudget); !pass {
				mu.Lock()
				failed = append(failed, g.Name())
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failed) > 0 {
		t.Fatalf("guests failed (summaries above): %s", strings.Join(failed, ", "))
	}
}

// payload is a tar of files with random content plus their SHA256SUMS, handed to a guest; blocks
// are 4 KiB pieces of the files at ext4 block boundaries, searched for in volume files.
type payload struct {
	tar    []byte
	blocks [][]byte
}

func newPayload(t *testing.T, files int) *payload {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	p := &payload{}
	var sums strings.Builder
	add := func(name string, b []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < files; i++ {
		// Small: fw_cfg reads are slow under TCG (a 1.2 MB tar took ~40 s on a busy host).
		b := make([]byte, (16+16*i)<<10)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("f%d.bin", i)
		add(name, b)
		sum := sha256.Sum256(b)
		fmt.Fprintf(&sums, "%s  %s\n", hex.EncodeToString(sum[:]), name)
		// First and last full block of each file.
		p.blocks = append(p.blocks, b[:4096], b[len(b)-4096:])
	}
	add("SHA256SUMS", []byte(sums.String()))
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	p.tar = buf.Bytes()
	return p
}

func (p *payload) blocksIn(vol []byte) int {
	n := 0
	for _, b := range p.blocks {
		if bytes.Contains(vol, b) {
			n++
		}
	}
	return n
}
