package target

import (
	"bytes"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"nstarget/target/chap"
)

// syncBuffer collects log output written from server goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startCHAPServer(t *testing.T, delay time.Duration, creds, disc *chap.Credentials) (*testServer, *syncBuffer) {
	logs := &syncBuffer{}
	opts := Options{AuthFailDelay: delay, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))}
	ts := startRAMServerWith(t, opts, Limits{}, func(cfg *TargetConfig, tn *Tenant) {
		cfg.CHAP = creds
		tn.DiscoveryCHAP = disc
	})
	return ts, logs
}

// chapExchange is what one CHAP login over TCP saw.
type chapExchange struct {
	alg  chap.Algorithm
	id   byte
	chal []byte
	last *frame
}

// loginCHAP runs the security stage as an initiator does; answer computes CHAP_N/R (and any
// mutual keys) from the target's challenge. It returns the last response (a failure or the
// move to the operational stage).
func (ini *testInitiator) loginCHAP(offer string, answer func(x *chapExchange) []string) *chapExchange {
	ini.t.Helper()
	x := &chapExchange{}
	step := func(transit bool, kvs ...string) *frame {
		req := loginReq(0, 1, transit, false, kvs...)
		req.BHS.setU32(offCmdSN, ini.cmdSN)
		ini.send(&req.BHS, req.Data)
		return ini.recv()
	}
	f := step(false, "InitiatorName=iqn.i:chap", "TargetName=iqn.2026-01.test.nstarget:ram", "AuthMethod=CHAP,None")
	if status(f.BHS) != 0 {
		x.last = f
		return x
	}
	f = step(false, "CHAP_A="+offer)
	if status(f.BHS) != 0 {
		x.last = f
		return x
	}
	a := answers(ini.t, f.Data)
	n, _ := strconv.Atoi(a["CHAP_A"])
	id, _ := strconv.Atoi(a["CHAP_I"])
	x.alg, x.id = chap.Algorithm(n), byte(id)
	x.chal, _ = chap.DecodeBinary(a["CHAP_C"])
	x.last = step(true, answer(x)...)
	return x
}

func (ini *testInitiator) finishLogin() {
	ini.t.Helper()
	req := loginReq(1, 3, true, false, "HeaderDigest=None")
	req.BHS.setU32(offCmdSN, ini.cmdSN)
	ini.send(&req.BHS, req.Data)
	f := ini.recv()
	if status(f.BHS) != 0 || f.BHS[1]&flagTransit == 0 {
		ini.t.Fatalf("operational stage: status %04x", status(f.BHS))
	}
	ini.statSN = f.BHS.u32(offCmdSN) + 1
}

func TestOwnInitiatorLogsInWithMutualCHAPOverSHA256AndSHA3(t *testing.T) {
	creds := testCreds(true)
	ts, logs := startCHAPServer(t, time.Millisecond, creds, nil)
	for _, alg := range []chap.Algorithm{chap.SHA256, chap.SHA3_256} {
		ini := dialTest(t, ts)
		ic := bytes.Repeat([]byte{byte(alg)}, 32)
		x := ini.loginCHAP(strconv.Itoa(int(alg))+",5", func(x *chapExchange) []string {
			r := x.alg.Response(x.id, chap.NewSecret([]byte(testSecret)), x.chal)
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + chap.EncodeHex(r), "CHAP_I=77", "CHAP_C=" + chap.EncodeHex(ic)}
		})
		if x.alg != alg || status(x.last.BHS) != 0 {
			t.Fatalf("%v: chose %v, status %04x", alg, x.alg, status(x.last.BHS))
		}
		a := answers(t, x.last.Data)
		got, _ := chap.DecodeBinary(a["CHAP_R"])
		if a["CHAP_N"] != mutUser || !alg.Verify(77, chap.NewSecret([]byte(mutSecret)), ic, got) {
			t.Fatalf("%v: the target did not prove the mutual secret: %v", alg, a)
		}
		ini.finishLogin()
		ini.nopOut(5, true)
		if f := ini.recv(); f.BHS.opcode() != opNopIn {
			t.Fatalf("%v: no NOP-In after the CHAP login", alg)
		}
	}
	if strings.Contains(logs.String(), testSecret) {
		t.Fatal("a secret reached the log")
	}
}

func TestFailedAuthenticationIsLoggedAndRefusedAfterTheDelay(t *testing.T) {
	const delay = 300 * time.Millisecond
	ts, logs := startCHAPServer(t, delay, testCreds(false), nil)
	ini := dialTest(t, ts)
	start := time.Now()
	x := ini.loginCHAP("7", func(x *chapExchange) []string {
		r := x.alg.Response(x.id, chap.NewSecret([]byte("a guessed secret")), x.chal)
		return []string{"CHAP_N=" + testUser, "CHAP_R=" + chap.EncodeHex(r)}
	})
	if status(x.last.BHS) != loginAuthFailure {
		t.Fatalf("wrong secret: status %04x", status(x.last.BHS))
	}
	if el := time.Since(start); el < delay {
		t.Fatalf("refusal came after %v, before the %v delay", el, delay)
	}
	// The log line is written before the refusal is sent.
	out := logs.String()
	line := ""
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "authentication failed") {
			line = l
		}
	}
	for _, want := range []string{"level=INFO", "tenant=t1", "initiator=iqn.i:chap", "remote=127.0.0.1:", "algorithm=SHA-256", "target=iqn.2026-01.test.nstarget:ram"} {
		if !strings.Contains(line, want) {
			t.Fatalf("auth failure log lacks %q: %q", want, line)
		}
	}
	if strings.Contains(out, testSecret) || strings.Contains(out, "a guessed secret") || strings.Contains(out, "login failed") {
		t.Fatalf("log carries a secret or a second line: %s", out)
	}
}

func TestReflectedChallengeIsRefusedOverTCP(t *testing.T) {
	ts, _ := startCHAPServer(t, time.Millisecond, testCreds(true), nil)
	victim := dialTest(t, ts)
	var stolen *chapExchange
	// The first connection only collects a challenge and never answers it.
	req := loginReq(0, 1, false, false, "InitiatorName=iqn.i:chap", "TargetName=iqn.2026-01.test.nstarget:ram", "AuthMethod=CHAP")
	victim.send(&req.BHS, req.Data)
	victim.recv()
	req = loginReq(0, 1, false, false, "CHAP_A=5")
	victim.send(&req.BHS, req.Data)
	a := answers(t, victim.recv().Data)
	c, _ := chap.DecodeBinary(a["CHAP_C"])
	id, _ := strconv.Atoi(a["CHAP_I"])
	stolen = &chapExchange{chal: c, id: byte(id)}

	attacker := dialTest(t, ts)
	x := attacker.loginCHAP("5", func(x *chapExchange) []string {
		r := x.alg.Response(x.id, chap.NewSecret([]byte(testSecret)), x.chal)
		return []string{"CHAP_N=" + testUser, "CHAP_R=" + chap.EncodeHex(r),
			"CHAP_I=" + strconv.Itoa(int(stolen.id)), "CHAP_C=" + chap.EncodeHex(stolen.chal)}
	})
	if status(x.last.BHS) != loginAuthFailure || len(x.last.Data) != 0 {
		t.Fatalf("reflected challenge: status %04x, %d bytes of answer", status(x.last.BHS), len(x.last.Data))
	}
}

// Reproduces what real initiators hit: MaxBurstLength=4096 with FirstBurstLength=65536
// offered was answered 65536, so the initiator sent 64 KiB of immediate data and the
// target, holding 4096, rejected it and closed the connection.
func TestFirstBurstIsNeverAnsweredAboveMaxBurst(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	f := ini.login("iqn.i:fb", 1, "ImmediateData=Yes", "InitialR2T=No", "FirstBurstLength=65536", "MaxBurstLength=4096")
	a := answers(t, f.Data)
	fb, _ := strconv.Atoi(a["FirstBurstLength"])
	mb, _ := strconv.Atoi(a["MaxBurstLength"])
	if mb != 4096 || fb != 4096 {
		t.Fatalf("answered FirstBurstLength=%s MaxBurstLength=%s", a["FirstBurstLength"], a["MaxBurstLength"])
	}
	// An initiator then sends what it was allowed: FirstBurstLength of immediate data.
	payload := bytes.Repeat([]byte{0xc3}, fb)
	ini.scsi(cdb10(0x2a, 8, uint16(fb/512)), uint32(fb), false, true, payload, true)
	if r := ini.recv(); r.BHS.opcode() != opSCSIResp || r.BHS[3] != 0 {
		t.Fatalf("write of one first burst: op %02x status %d", r.BHS.opcode(), r.BHS[3])
	}
}

// iscsiadm ends SendTargets discovery with a TCP reset instead of a Logout: that is normal
// and must not be logged as a failure.
func TestDiscoveryEndedByResetIsNotLoggedAsAFailure(t *testing.T) {
	logs := &syncBuffer{}
	ts := startRAMServer(t, Options{Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	ini := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:disc", "SessionType=Discovery")
	ini.send(&req.BHS, req.Data)
	if f := ini.recv(); status(f.BHS) != 0 {
		t.Fatalf("discovery login: %04x", status(f.BHS))
	}
	ini.c.(*net.TCPConn).SetLinger(0) // close sends RST
	ini.c.Close()
	deadline := time.Now().Add(testTimeout)
	for !strings.Contains(logs.String(), "connection ended") {
		if time.Now().After(deadline) {
			t.Fatal("the server never ended the connection")
		}
		time.Sleep(5 * time.Millisecond)
	}
	out := logs.String()
	if !strings.Contains(out, "discovery connection reset by the initiator") {
		t.Fatalf("reset not seen as such:\n%s", out)
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "connection ended") && !strings.Contains(l, "level=DEBUG") || strings.Contains(l, "level=WARN") || strings.Contains(l, "connection closed") {
			t.Fatalf("reset logged as a failure: %s", l)
		}
	}
}

func TestTaskManagementIsLoggedWithTenantInitiatorLUNAndOutcome(t *testing.T) {
	logs := &syncBuffer{}
	ts := startRAMServer(t, Options{Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	ini := dialTest(t, ts)
	ini.login("iqn.i:tmf", 1)
	var h bhs
	h[0] = opTMFReq | flagImmediate
	h[1] = flagFinal | 5 // LUN RESET
	h[9] = 0             // LUN 0
	h.setU32(offITT, 99)
	h.setU32(offRTT, reservedTag)
	h.setU32(offCmdSN, ini.cmdSN)
	h.setU32(offExpStatSN, ini.statSN)
	ini.send(&h, nil)
	f := ini.recv()
	if f.BHS.opcode() != opTMFResp || f.BHS[offResponse] != 0 {
		t.Fatalf("LUN RESET: op %02x response %d", f.BHS.opcode(), f.BHS[offResponse])
	}
	line := waitLogLine(t, logs, "task management")
	for _, want := range []string{"level=INFO", "tenant=t1", "initiator=iqn.i:tmf", "lun=0", "response=0", "function="} {
		if !strings.Contains(line, want) {
			t.Fatalf("TMF log line lacks %q: %q", want, line)
		}
	}
}

// waitLogLine waits for a log line containing msg: the edge may write a response before it
// writes the log lines of the same step.
func waitLogLine(t *testing.T, logs *syncBuffer, msg string) string {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		for _, l := range strings.Split(logs.String(), "\n") {
			if strings.Contains(l, msg) {
				return l
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line %q:\n%s", msg, logs.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
}
