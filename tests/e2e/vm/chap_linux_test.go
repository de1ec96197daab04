package vm_test

import (
	"os"
	"strings"
	"testing"
)

// open-iscsi against CHAP: the tenant's discovery credentials, the target's one-way and mutual
// credentials, and wrong secrets refused as authentication failures (iscsiadm rc 24) with no
// session and no disk left behind. nstarget logs each refusal, never a secret.
func TestOpenISCSIAuthenticatesWithCHAP(t *testing.T) {
	if os.Getenv("NSTARGET_E2E_PEER") == "tgtd" {
		t.Skip("the tgtd bring-up peer is not configured with CHAP")
	}
	t.Parallel()
	s := getSuite(t)
	const iqn = "iqn.2026-11.com.example:acme.chap"
	target := &chapSpec{user: "acme-host", secret: "initiator-secret-1",
		mutualUser: iqn, mutualSecret: "target-secret-22"}
	disc := &chapSpec{user: "acme-discovery", secret: "discovery-secret-3"}
	tenants := []tenantSpec{{name: "acme", ns: s.nsName("chap"), discoveryCHAP: disc,
		targets: []targetSpec{{iqn: iqn, chap: target, luns: []lunSpec{{id: 0, volume: "acme-chap", size: volumeSize}}}}}}
	addNetns(t, tenants[0].ns)
	srv := newServer(t, s, tenants)
	srv.start(t)
	g := s.bootGuests(t, guestSpec{name: "chap", ns: tenants[0].ns, script: "chap.sh",
		params: map[string]string{"iname": host1, "iqn": iqn,
			"user": target.user, "secret": target.secret, "muser": target.mutualUser, "msecret": target.mutualSecret,
			"duser": disc.user, "dsecret": disc.secret}})[0]
	pass, _ := g.Result(guestBudget)
	srv.stop(t)
	if !pass {
		t.Fatalf("guest %s failed (summary above)", g.Name())
	}
	n := srv.(*nstargetServer)
	logs, err := os.ReadFile(n.logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{target.secret, target.mutualSecret, disc.secret, "not-the-right-secret", "not-the-discovery-secret"} {
		if strings.Contains(string(logs), secret) {
			t.Errorf("nstarget logged a secret")
		}
	}
	if got := strings.Count(string(logs), `msg="authentication failed"`); got < 4 {
		t.Errorf("nstarget logged %d failed authentications, want at least 4 (discovery ×2, login ×2)", got)
	}
}
