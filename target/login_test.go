package target

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"nstarget/target/chap"
)

type fakeLoginEnv struct {
	targets   map[string]*Target
	completed int
	disc      *chap.Credentials
	issuedLog *challengeLog
	nextID    byte
}

func (e *fakeLoginEnv) discoveryCHAP() *chap.Credentials { return e.disc }

func (e *fakeLoginEnv) challenge(n int) (byte, []byte) {
	if e.issuedLog == nil {
		e.issuedLog = newChallengeLog()
	}
	c := make([]byte, n)
	for {
		rand.Read(c)
		if e.issuedLog.add(c) {
			e.nextID++
			return e.nextID, c
		}
	}
}

func (e *fakeLoginEnv) issued(c []byte) bool { return e.issuedLog != nil && e.issuedLog.has(c) }

func (e *fakeLoginEnv) findTarget(name, initiator string) (*Target, uint16) {
	tg := e.targets[name]
	if tg == nil {
		return nil, loginNotFound
	}
	if !tg.allows(initiator) {
		return nil, loginAuthorizationFail
	}
	return tg, 0
}

func (e *fakeLoginEnv) complete(ls *loginState) (uint16, uint16) {
	e.completed++
	return 0x1234, 0
}

func newFakeEnv() *fakeLoginEnv {
	open := &Target{cfg: TargetConfig{IQN: "iqn.t:open", Alias: "disk"}}
	closed := &Target{cfg: TargetConfig{IQN: "iqn.t:closed"}, allow: map[string]bool{"iqn.i:good": true}}
	return &fakeLoginEnv{targets: map[string]*Target{"iqn.t:open": open, "iqn.t:closed": closed}}
}

func loginReq(csg, nsg byte, transit, cont bool, kvs ...string) *frame {
	f := &frame{}
	f.BHS[0] = opLoginReq | flagImmediate
	f.BHS[1] = csg<<2 | nsg
	if transit {
		f.BHS[1] |= flagTransit
	}
	if cont {
		f.BHS[1] |= flagContinue
	}
	copy(f.BHS[8:14], []byte{0x80, 1, 2, 3, 4, 5})
	f.BHS.setU32(offITT, 1)
	f.BHS.setU32(offCmdSN, 100)
	for _, kv := range kvs {
		f.Data = append(f.Data, kv...)
		f.Data = append(f.Data, 0)
	}
	return f
}

func status(h bhs) uint16 { return uint16(h[36])<<8 | uint16(h[37]) }

func answers(t *testing.T, data []byte) map[string]string {
	t.Helper()
	kvs, _, err := parseTextKeys(data, false)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return m
}

func TestLoginRefusalsCarryTheRightStatus(t *testing.T) {
	cases := []struct {
		name string
		req  *frame
		want uint16
	}{
		{"no initiator name", loginReq(1, 3, true, false, "TargetName=iqn.t:open"), loginMissingParam},
		{"no target name", loginReq(1, 3, true, false, "InitiatorName=iqn.i:x"), loginMissingParam},
		{"other tenant's target", loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:elsewhere"), loginNotFound},
		{"initiator not allowed", loginReq(1, 3, true, false, "InitiatorName=iqn.i:bad", "TargetName=iqn.t:closed"), loginAuthorizationFail},
		{"CHAP only", loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "AuthMethod=CHAP"), loginAuthFailure},
		{"bad session type", loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "SessionType=Weird"), loginSessionTypeUnsup},
		{"transit backwards", loginReq(1, 0, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open"), loginInitiatorError},
		{"T and C together", loginReq(1, 3, true, true, "InitiatorName=iqn.i:x"), loginInitiatorError},
		{"reserved stage", loginReq(2, 3, true, false, "InitiatorName=iqn.i:x"), loginInitiatorError},
		{"duplicate key", loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "MaxBurstLength=512", "MaxBurstLength=1024"), loginInitiatorError},
		{"garbage text", &frame{BHS: loginReq(1, 3, true, false).BHS, Data: []byte("no-equals\x00")}, loginInitiatorError},
	}
	for _, tc := range cases {
		ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
		resp, _, fail := ls.step(tc.req)
		if !fail || status(resp) != tc.want {
			t.Errorf("%s: fail=%v status=0x%04x, want 0x%04x", tc.name, fail, status(resp), tc.want)
		}
		if resp[0] != opLoginResp || resp.itt() != 1 {
			t.Errorf("%s: response opcode/ITT wrong", tc.name)
		}
	}

	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open")
	req.BHS[3] = 1 // VersionMin 1
	if resp, _, fail := ls.step(req); !fail || status(resp) != loginUnsupportedVersion {
		t.Errorf("version: status 0x%04x", status(resp))
	}
	ls = newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	req = loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open")
	binary.BigEndian.PutUint16(req.BHS[14:16], 77)
	if resp, _, fail := ls.step(req); !fail || status(resp) != loginNoSession {
		t.Errorf("unknown TSIH: status 0x%04x", status(resp))
	}
}

func TestLoginSecurityThenOperationalStage(t *testing.T) {
	env := newFakeEnv()
	ls := newLoginState(env, DefaultPolicy(), 128)
	resp, data, fail := ls.step(loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "AuthMethod=None", "SessionType=Normal"))
	if fail || resp[1] != flagTransit|0<<2|1 {
		t.Fatalf("security stage: fail=%v flags=%02x", fail, resp[1])
	}
	a := answers(t, data)
	if a["AuthMethod"] != "None" || a["TargetPortalGroupTag"] != "1" || a["TargetAlias"] != "disk" {
		t.Fatalf("security answers: %v", a)
	}
	if binary.BigEndian.Uint16(resp[14:16]) != 0 {
		t.Fatal("TSIH set before login completed")
	}
	first := resp.u32(offCmdSN)
	// Operational keys split over two PDUs with the C bit.
	part := loginReq(1, 0, false, true)
	part.Data = []byte("HeaderDigest=None\x00MaxRecvDataSeg")
	resp, data, fail = ls.step(part)
	if fail || len(data) != 0 || resp[1]&flagTransit != 0 {
		t.Fatalf("continuation: fail=%v data=%q flags=%02x", fail, data, resp[1])
	}
	rest := loginReq(1, 3, true, false)
	rest.Data = []byte("mentLength=65536\x00ImmediateData=Yes\x00InitialR2T=No\x00MaxBurstLength=262144\x00FirstBurstLength=65536\x00ErrorRecoveryLevel=0\x00")
	resp, data, fail = ls.step(rest)
	if fail || resp[1] != flagTransit|1<<2|3 {
		t.Fatalf("operational: fail=%v flags=%02x status=%04x", fail, resp[1], status(resp))
	}
	a = answers(t, data)
	if a["MaxRecvDataSegmentLength"] != "262144" || a["HeaderDigest"] != "None" || a["InitialR2T"] != "No" || a["MaxBurstLength"] != "262144" {
		t.Fatalf("operational answers: %v", a)
	}
	if binary.BigEndian.Uint16(resp[14:16]) != 0x1234 || !ls.done || env.completed != 1 {
		t.Fatal("final response lacks TSIH or session not admitted")
	}
	if resp.u32(offCmdSN) != first+2 || resp.u32(offExpStatSN) != 100 || resp.u32(offMaxCmdSN) != 100+127 {
		t.Fatalf("StatSN/ExpCmdSN/MaxCmdSN = %d/%d/%d", resp.u32(offCmdSN), resp.u32(offExpStatSN), resp.u32(offMaxCmdSN))
	}
	if ls.params.InitiatorRecvDSL != 65536 || ls.params.InitialR2T || !ls.params.ImmediateData {
		t.Fatalf("params: %+v", ls.params)
	}
}

func TestDiscoveryLoginMarksSessionKeysIrrelevant(t *testing.T) {
	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	resp, data, fail := ls.step(loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "SessionType=Discovery", "MaxBurstLength=262144", "HeaderDigest=None"))
	if fail || !ls.discovery || !ls.done {
		t.Fatalf("discovery login failed: status %04x", status(resp))
	}
	a := answers(t, data)
	if a["MaxBurstLength"] != "Irrelevant" || a["HeaderDigest"] != "None" {
		t.Fatalf("answers %v", a)
	}
	if _, ok := a["TargetPortalGroupTag"]; ok {
		t.Fatal("TPGT declared in a discovery session")
	}
	if !strings.Contains(string(data), "MaxRecvDataSegmentLength=") {
		t.Fatal("target did not declare its MaxRecvDataSegmentLength")
	}
}

func TestLoginRequestMustKeepISID(t *testing.T) {
	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	if _, _, fail := ls.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "AuthMethod=None")); fail {
		t.Fatal("first step failed")
	}
	req := loginReq(0, 1, true, false)
	req.BHS[13] ^= 0xff
	if resp, _, fail := ls.step(req); !fail || status(resp) != loginInitiatorError {
		t.Fatalf("changed ISID accepted: status %04x", status(resp))
	}
}

func TestLongLoginResponseGoesOutInPartsWithTheContinueBit(t *testing.T) {
	env := newFakeEnv()
	ls := newLoginState(env, DefaultPolicy(), 128)
	// 2,000 keys we do not understand: each is answered NotUnderstood, ~30 KiB in all.
	kvs := []string{"InitiatorName=iqn.i:x", "TargetName=iqn.t:open"}
	for i := range 2000 {
		kvs = append(kvs, fmt.Sprintf("X-vendor-%04d=1", i))
	}
	resp, data, fail := ls.step(loginReq(1, 3, true, false, kvs...))
	var all []byte
	parts := 0
	for {
		parts++
		if fail || len(data) > loginResponseLimit {
			t.Fatalf("part %d: fail=%v, %d bytes", parts, fail, len(data))
		}
		all = append(all, data...)
		if resp[1]&flagContinue == 0 {
			break
		}
		if resp[1]&flagTransit != 0 || ls.done || binary.BigEndian.Uint16(resp[offTSIH:]) != 0 {
			t.Fatalf("part %d with C also transits (flags %02x) or carries a TSIH", parts, resp[1])
		}
		resp, data, fail = ls.step(loginReq(1, 3, false, false))
	}
	if parts < 4 || resp[1] != flagTransit|1<<2|3 || !ls.done || binary.BigEndian.Uint16(resp[offTSIH:]) != 0x1234 {
		t.Fatalf("%d parts, last flags %02x done %v", parts, resp[1], ls.done)
	}
	a := answers(t, all)
	if len(a) < 2000 || a["X-vendor-1999"] != valNotUnderstood {
		t.Fatalf("%d answers", len(a))
	}
}
