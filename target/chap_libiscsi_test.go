package target

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"nstarget/target/chap"
)

// runExpectFail runs a command that must fail and returns its output.
func runExpectFail(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %s succeeded, want a refusal:\n%s", name, strings.Join(args, " "), out)
	}
	return string(out)
}

// libiscsi 1.19 speaks CHAP with MD5 only: user%secret@ in the URL, and target_user /
// target_password URL arguments for mutual CHAP.
func TestLibiscsiLogsInWithOneWayAndMutualCHAP(t *testing.T) {
	needTool(t, "iscsi-inq", "libiscsi-bin")
	creds := &chap.Credentials{User: "libiscsi-user", Secret: chap.NewSecret([]byte("libiscsi-secret-1")),
		MutualUser: "the-target", MutualSecret: chap.NewSecret([]byte("target-secret-22"))}
	disc := &chap.Credentials{User: "disc-user", Secret: chap.NewSecret([]byte("discovery-secret-3"))}
	ts, logs := startCHAPServer(t, time.Millisecond, creds, disc)
	url := func(user, secret, query string) string {
		return fmt.Sprintf("iscsi://%s%%%s@%s/%s/0%s", user, secret, ts.addr, ts.iqn, query)
	}
	if out := run(t, "iscsi-inq", url("libiscsi-user", "libiscsi-secret-1", "")); !strings.Contains(out, "RAMDISK") {
		t.Fatalf("one-way CHAP: %s", out)
	}
	if out := run(t, "iscsi-inq", url("libiscsi-user", "libiscsi-secret-1", "?target_user=the-target&target_password=target-secret-22")); !strings.Contains(out, "RAMDISK") {
		t.Fatalf("mutual CHAP: %s", out)
	}
	runExpectFail(t, "iscsi-inq", url("libiscsi-user", "libiscsi-secret-X", ""))
	runExpectFail(t, "iscsi-inq", url("someone-else", "libiscsi-secret-1", ""))
	runExpectFail(t, "iscsi-inq", fmt.Sprintf("iscsi://%s/%s/0", ts.addr, ts.iqn))
	// The target must prove the mutual secret: libiscsi refuses a target that does not.
	out := runExpectFail(t, "iscsi-inq", url("libiscsi-user", "libiscsi-secret-1", "?target_user=the-target&target_password=not-the-target-secret"))
	if !strings.Contains(out, "CHAP_R") {
		t.Logf("libiscsi's refusal of a wrong target secret: %s", out)
	}
	// Discovery has the tenant's own credentials.
	// (iscsi-ls without -s: with -s it also logs in to each target with the same credentials.)
	if out := run(t, "iscsi-ls", fmt.Sprintf("iscsi://disc-user%%discovery-secret-3@%s", ts.addr)); !strings.Contains(out, ts.iqn) {
		t.Fatalf("discovery with CHAP: %s", out)
	}
	runExpectFail(t, "iscsi-ls", fmt.Sprintf("iscsi://libiscsi-user%%libiscsi-secret-1@%s", ts.addr))
	runExpectFail(t, "iscsi-ls", "iscsi://"+ts.addr)
	for _, s := range []string{"libiscsi-secret-1", "target-secret-22", "discovery-secret-3", "libiscsi-secret-X"} {
		if strings.Contains(logs.String(), s) {
			t.Fatalf("a secret reached the log")
		}
	}
	if n := strings.Count(logs.String(), "authentication failed"); n < 4 {
		t.Fatalf("%d failed authentications logged, want at least 4:\n%s", n, logs.String())
	}
}
