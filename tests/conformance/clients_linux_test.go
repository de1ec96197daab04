package conformance

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestLibiscsiToolsAndQemuReadBackWhatTheyWrote drives the target with real initiators inside
// the namespace: discovery and inquiry tools, then QEMU's iSCSI driver writing patterns and
// reading them back (also across sessions).
func TestLibiscsiToolsAndQemuReadBackWhatTheyWrote(t *testing.T) {
	needTools(t, "iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-io", "ip")
	ns := testNS(t, "cl")
	iqn := "iqn.2026-01.io.nstarget:clients"
	_, addr := serveTargets(t, ns, []string{iqn}, 256<<20, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	must := func(args ...string) string {
		t.Helper()
		out, err := inNS(ctx, ns, args...)
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	url := fmt.Sprintf("iscsi://%s/%s/0", addr, iqn)

	out := must("iscsi-ls", "-s", "iscsi://"+addr)
	if !strings.Contains(out, iqn) || !strings.Contains(out, addr) {
		t.Fatalf("iscsi-ls does not show %s at %s:\n%s", iqn, addr, out)
	}
	out = must("iscsi-inq", url)
	if !strings.Contains(out, "Peripheral Device Type:DIRECT_ACCESS") {
		t.Fatalf("iscsi-inq:\n%s", out)
	}
	out = must("iscsi-readcapacity16", url)
	if !strings.Contains(out, fmt.Sprint(256<<20/512)) && !strings.Contains(out, fmt.Sprint(256<<20)) {
		t.Fatalf("iscsi-readcapacity16 does not report 256 MiB:\n%s", out)
	}

	must("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5c 8M 4M", "-c", "write -P 0x11 255M 1M", url)
	out = must("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", "-c", "read -P 0x5c 8M 4M",
		"-c", "read -P 0x11 255M 1M", "-c", "read -P 0 1M 1M", url)
	if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != 4 {
		t.Fatalf("qemu-io read-back:\n%s", out)
	}
	out = must("qemu-img", "info", url)
	if !strings.Contains(out, "256 MiB") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
}
