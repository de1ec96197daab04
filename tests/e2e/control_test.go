//go:build linux

package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// statusJSON is the part of `nstarget status -o json` the tests read.
type statusJSON struct {
	Tenants []struct {
		Name     string `json:"name"`
		Netns    string `json:"netns"`
		NetnsID  uint64 `json:"netns_id"`
		State    string `json:"state"`
		Portal   string `json:"portal"`
		Sessions []struct {
			Initiator    string    `json:"initiator"`
			Target       string    `json:"target"`
			ISID         string    `json:"isid"`
			TSIH         int       `json:"tsih"`
			Remote       string    `json:"remote"`
			Since        time.Time `json:"since"`
			Commands     uint64    `json:"commands"`
			ReadBytes    uint64    `json:"read_bytes"`
			WrittenBytes uint64    `json:"written_bytes"`
		} `json:"sessions"`
		Targets []struct {
			IQN  string `json:"iqn"`
			LUNs []struct {
				ID     int    `json:"id"`
				Volume string `json:"volume"`
				Size   int64  `json:"size"`
			} `json:"luns"`
		} `json:"targets"`
	} `json:"tenants"`
}

func TestStatusShowsTenantsAndAttachedSessionsAndShrugsOffBadClients(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "run", "ctl.sock")
	p := newPair(t, "ctl")
	cfg := writeConfig(t, dir, "c.toml", fmt.Sprintf(`
[server]
data_dir = "@POOL@"
control_socket = %q

[[tenant]]
name = "ctl"
netns = "@P@-ctl"
portal = "10.0.0.1:3260"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:ctl"
    [[tenant.target.lun]]
    volume = "ctl"
    size = "8MiB"

[[tenant]]
name = "absent"
netns = "@P@-absent-never-created"
  [[tenant.target]]
  iqn = "iqn.2026-11.org.nstarget:absent"
    [[tenant.target.lun]]
    volume = "absent"
    size = "8MiB"
`, sock))
	s := startServe(t, cfg)
	nsID := s.listening(p.tenant, 1)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, mode %v (want 0600)", err, fi.Mode().Perm())
	}

	// A client that hangs and one that sends garbage disturb neither the server nor others.
	hung, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()
	bad, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	bad.Write([]byte("\x00\xff{{{not json\n"))
	line, err := bufio.NewReader(bad).ReadString('\n')
	bad.Close()
	if err != nil || !strings.Contains(line, `"error":"bad request`) {
		t.Fatalf("garbage got %q, %v", line, err)
	}

	p.session(t, "iscsi://10.0.0.1/iqn.2026-11.org.nstarget:ctl/0")
	var st statusJSON
	waitFor(t, "the qemu-io session in status", func() error {
		code, out, errOut := runBin(t, "status", "-socket", sock, "-o", "json")
		if code != 0 {
			return fmt.Errorf("status exit %d: %s", code, errOut)
		}
		st = statusJSON{}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return fmt.Errorf("status JSON: %v: %s", err, out)
		}
		if len(st.Tenants) != 2 || len(st.Tenants[0].Sessions) != 1 {
			return fmt.Errorf("status: %s", out)
		}
		return nil
	})
	ctl, absent := st.Tenants[0], st.Tenants[1]
	if ctl.Name != "ctl" || ctl.State != "serving" || fmt.Sprint(ctl.NetnsID) != nsID || ctl.Portal != "10.0.0.1:3260" {
		t.Fatalf("tenant ctl: %+v (netns id want %s)", ctl, nsID)
	}
	if absent.Name != "absent" || absent.State != "waiting for namespace" || len(absent.Sessions) != 0 {
		t.Fatalf("tenant absent: %+v", absent)
	}
	ss := ctl.Sessions[0]
	if ss.Target != "iqn.2026-11.org.nstarget:ctl" || ss.TSIH == 0 || !strings.HasPrefix(ss.Remote, "10.0.0.2:") ||
		ss.Since.IsZero() || ss.Initiator == "" || len(ss.ISID) != 12 {
		t.Fatalf("session: %+v", ss)
	}
	if len(ctl.Targets) != 1 || len(ctl.Targets[0].LUNs) != 1 || ctl.Targets[0].LUNs[0].Volume != "ctl" || ctl.Targets[0].LUNs[0].Size != 8<<20 {
		t.Fatalf("targets: %+v", ctl.Targets)
	}

	// One tenant only, and the text form names it.
	code, out, errOut := runBin(t, "status", "-socket", sock, "ctl")
	if code != 0 || !strings.Contains(out, "ctl") || strings.Contains(out, "absent") || !strings.Contains(out, "iqn.2026-11.org.nstarget:ctl") {
		t.Fatalf("status ctl: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, errOut := runBin(t, "status", "-socket", sock, "nosuch"); code != 1 || !strings.Contains(errOut, `no tenant "nosuch"`) {
		t.Fatalf("status of an unknown tenant: exit %d: %s", code, errOut)
	}
	if code := s.stop(); code != 0 {
		t.Fatalf("serve exit %d", code)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("control socket left behind: %v", err)
	}
}
