//go:build linux

package e2e

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// PERSISTENT RESERVE OUT / IN (SPC-5 6.16, 6.17) through the raw client: libiscsi's tools
// send no PR commands, and there is no kernel initiator here.
const (
	prSARegister = 0x00
	prSAReserve  = 0x01
	prTypeEARO   = 0x06 // exclusive access, registrants only
	prInReadKeys = 0x00
	prInReadResv = 0x01
	prInFullStat = 0x03
	scsiResvConf = 0x18
)

func (rc *rawConn) prOut(sa, typ byte, key, sark uint64, aptpl bool) error {
	cdb := []byte{0x5F, sa, typ, 0, 0, 0, 0, 0, 24, 0}
	p := make([]byte, 24)
	binary.BigEndian.PutUint64(p[0:], key)
	binary.BigEndian.PutUint64(p[8:], sark)
	if aptpl {
		p[20] = 0x01
	}
	_, err := rc.do(scsiCmd{cdb: cdb, edtl: 24, write: true}, p)
	return err
}

func (rc *rawConn) prIn(sa byte) ([]byte, error) {
	const alloc = 4096
	return rc.do(scsiCmd{cdb: []byte{0x5E, sa, 0, 0, 0, 0, 0, alloc >> 8, alloc & 0xFF, 0}, edtl: alloc, read: true}, nil)
}

// prLogin logs host in from the initiator namespace with the given ISID.
func prLogin(t *testing.T, p *pair, host string, isid byte) *rawConn {
	t.Helper()
	rc, err := dialRaw(p.ini)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.nc.Close() })
	if err := rc.login(loginOpts{initiator: "iqn.2026-11.io.e2e:" + host, target: "iqn.2026-11.io.e2e:disk", isid: [6]byte{0x80, 0, 0, 0, 0, isid}}); err != nil {
		t.Fatalf("%s: %v", host, err)
	}
	return rc
}

func prMust(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func TestAPTPLReservationsSurviveKillNineAndRestart(t *testing.T) {
	p := newPair(t, "solo")
	cfg := writeConfig(t, t.TempDir(), "pr.toml", oneTenantConfig)
	srv := startServe(t, cfg)
	srv.listening(p.tenant, 1)

	a, b := prLogin(t, p, "host-a", 1), prLogin(t, p, "host-b", 2)
	prMust(t, "register host-a with APTPL", a.prOut(prSARegister, 0, 0, 0xAAAA, true))
	prMust(t, "register host-b with APTPL", b.prOut(prSARegister, 0, 0, 0xBBBB, true))
	prMust(t, "host-a reserves EA-RO", a.prOut(prSAReserve, prTypeEARO, 0xAAAA, 0, false))
	keysBefore, err := a.prIn(prInReadKeys)
	prMust(t, "READ KEYS before the kill", err)

	// No shutdown, no sync, no logout: the state must already be on disk.
	srv.cmd.Process.Kill()
	<-srv.done
	srv = startServe(t, cfg)
	srv.listening(p.tenant, 1)

	// The same initiator ports log in again (new sessions, new nexuses).
	a2, c := prLogin(t, p, "host-a", 1), prLogin(t, p, "host-c", 3)
	keys, err := a2.prIn(prInReadKeys)
	prMust(t, "READ KEYS after the restart", err)
	if string(keys) != string(keysBefore) || binary.BigEndian.Uint32(keys[4:]) != 16 ||
		binary.BigEndian.Uint64(keys[8:]) != 0xAAAA || binary.BigEndian.Uint64(keys[16:]) != 0xBBBB {
		t.Fatalf("READ KEYS after kill -9 and restart: % x, before: % x", keys, keysBefore)
	}
	resv, err := a2.prIn(prInReadResv)
	prMust(t, "READ RESERVATION after the restart", err)
	if len(resv) < 24 || binary.BigEndian.Uint64(resv[8:]) != 0xAAAA || resv[21]&0x0F != prTypeEARO {
		t.Fatalf("READ RESERVATION after restart: % x, want holder key 0xaaaa type EA-RO", resv)
	}
	full, err := a2.prIn(prInFullStat)
	prMust(t, "READ FULL STATUS after the restart", err)
	for _, host := range []string{"iqn.2026-11.io.e2e:host-a,i,0x800000000001", "iqn.2026-11.io.e2e:host-b,i,0x800000000002"} {
		if !strings.Contains(string(full), host) {
			t.Errorf("READ FULL STATUS after restart lacks the TransportID of %s: %q", host, full)
		}
	}
	// Enforced, not just reported: the holder writes, an unregistered host may not even read.
	prMust(t, "the restored holder writes", a2.write16(0, make([]byte, 4096)))
	_, err = c.read16(0, 512)
	var se *scsiError
	if !errors.As(err, &se) || se.status != scsiResvConf {
		t.Fatalf("unregistered host-c read after restart: %v, want RESERVATION CONFLICT", err)
	}
	prMust(t, "host-a logout", a2.logout())
	prMust(t, "host-c logout", c.logout())
	if code := srv.stop(); code != 0 {
		t.Errorf("serve exited %d after SIGTERM, want 0", code)
	}
}
