package target

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"nstarget/target/scsi"
)

// testTimeout bounds waits for something that must happen. Generous: other suites share the
// two cores, and a passing test never waits for it.
const testTimeout = 20 * time.Second

// testInitiator is a minimal hand-driven initiator for exercising session logic PDU by PDU.
type testInitiator struct {
	t      *testing.T
	c      net.Conn
	pr     pduReader
	cmdSN  uint32
	statSN uint32
	itt    uint32
}

func dialTest(t *testing.T, ts *testServer) *testInitiator {
	t.Helper()
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ini := &testInitiator{t: t, c: c, cmdSN: 1}
	ini.pr.r = bufio.NewReader(c)
	return ini
}

func (ini *testInitiator) send(h *bhs, data []byte) {
	ini.t.Helper()
	if _, err := ini.c.Write(appendPDU(nil, h, nil, data, ini.pr.headerDigest, ini.pr.dataDigest)); err != nil {
		ini.t.Fatal(err)
	}
}

func (ini *testInitiator) recv() *frame {
	ini.t.Helper()
	ini.c.SetReadDeadline(time.Now().Add(testTimeout))
	f, err := ini.pr.readFrame(1 << 24)
	if err != nil {
		ini.t.Fatalf("recv: %v", err)
	}
	return f
}

func (ini *testInitiator) login(name string, isid byte, keys ...string) *frame {
	ini.t.Helper()
	kvs := append([]string{"InitiatorName=" + name, "TargetName=iqn.2026-01.test.nstarget:ram", "SessionType=Normal"}, keys...)
	req := loginReq(1, 3, true, false, kvs...)
	req.BHS[13] = isid
	req.BHS.setU32(offCmdSN, ini.cmdSN)
	ini.send(&req.BHS, req.Data)
	f := ini.recv()
	if f.BHS.opcode() != opLoginResp || status(f.BHS) != 0 || f.BHS[1]&flagTransit == 0 {
		ini.t.Fatalf("login failed: op %02x status %04x", f.BHS.opcode(), status(f.BHS))
	}
	ini.statSN = f.BHS.u32(offCmdSN) + 1
	return f
}

func (ini *testInitiator) scsi(cdb []byte, edtl uint32, read, write bool, immediate []byte, final bool) uint32 {
	ini.itt++
	h := scsiCmdHeader(ini.itt, edtl, ini.cmdSN, rwFlags(read, write, final), cdb)
	h.setU32(offExpStatSN, ini.statSN)
	ini.cmdSN++
	ini.send(&h, immediate)
	return ini.itt
}

func (ini *testInitiator) dataOut(itt, ttt, dataSN, off uint32, data []byte, final bool) {
	var h bhs
	h[0] = opDataOut
	if final {
		h[1] = flagFinal
	}
	h.setU32(offITT, itt)
	h.setU32(offTTT, ttt)
	h.setU32(offDataSN, dataSN)
	h.setU32(offBufOffset, off)
	ini.send(&h, data)
}

func (ini *testInitiator) nopOut(itt uint32, immediate bool) {
	var h bhs
	h[0] = opNopOut
	if immediate {
		h[0] |= flagImmediate
	}
	h[1] = flagFinal
	h.setU32(offITT, itt)
	h.setU32(offTTT, reservedTag)
	h.setU32(offCmdSN, ini.cmdSN)
	if !immediate {
		ini.cmdSN++
	}
	ini.send(&h, []byte("ping"))
}

func TestWriteUsesImmediateUnsolicitedAndR2TDataThenReadsBack(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:w", 1, "ImmediateData=Yes", "InitialR2T=No", "FirstBurstLength=16384",
		"MaxBurstLength=32768", "MaxOutstandingR2T=2", "MaxRecvDataSegmentLength=8192")
	const size = 200 * 1024
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i*7 + i>>9)
	}
	// 4 KiB immediate, then unsolicited Data-Out up to FirstBurstLength (16 KiB).
	itt := ini.scsi(cdb10(0x2a, 64, size/512), size, false, true, payload[:4096], false)
	ini.dataOut(itt, reservedTag, 0, 4096, payload[4096:12288], false)
	ini.dataOut(itt, reservedTag, 1, 12288, payload[12288:16384], true)
	sent := 16384
	outstanding := map[uint32]bool{}
	for sent < size || len(outstanding) > 0 {
		f := ini.recv()
		if f.BHS.opcode() == opSCSIResp {
			t.Fatalf("response before all data: status %d", f.BHS[3])
		}
		if f.BHS.opcode() != opR2T {
			t.Fatalf("expected R2T, got %02x", f.BHS.opcode())
		}
		off, length, ttt := f.BHS.u32(offBufOffset), f.BHS.u32(offResidual), f.BHS.u32(offTTT)
		if length > 32768 {
			t.Fatalf("R2T asks %d bytes > MaxBurstLength", length)
		}
		outstanding[ttt] = true
		if len(outstanding) > 2 {
			t.Fatalf("more than MaxOutstandingR2T R2Ts outstanding")
		}
		// Answer in 8 KiB PDUs (our MaxRecvDataSegmentLength is larger; that is allowed).
		var sn uint32
		for o := off; o < off+length; o += 8192 {
			end := min(o+8192, off+length)
			ini.dataOut(itt, ttt, sn, o, payload[o:end], end == off+length)
			sn++
		}
		delete(outstanding, ttt)
		sent = int(off + length)
		if sent == size {
			break
		}
	}
	f := ini.recv()
	if f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatalf("write response: op %02x status %d", f.BHS.opcode(), f.BHS[3])
	}
	ini.scsi(cdb10(0x28, 64, size/512), size, true, false, nil, true)
	got := make([]byte, 0, size)
	for {
		f := ini.recv()
		if f.BHS.opcode() != opDataIn {
			t.Fatalf("expected Data-In, got %02x", f.BHS.opcode())
		}
		if int(f.BHS.u32(offBufOffset)) != len(got) || len(f.Data) > 8192 {
			t.Fatalf("Data-In offset %d len %d", f.BHS.u32(offBufOffset), len(f.Data))
		}
		got = append(got, f.Data...)
		if f.BHS[1]&0x01 != 0 {
			break
		}
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("read back differs from what was written")
	}
}

func TestReinstatementClosesOldSessionAndReportsNexusLoss(t *testing.T) {
	ts := startRAMServer(t, Options{})
	old := dialTest(t, ts)
	old.login("iqn.i:same", 7)
	other := dialTest(t, ts)
	other.login("iqn.i:same", 8) // different ISID: a second session, left alone
	nu := dialTest(t, ts)
	nu.login("iqn.i:same", 7)
	old.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := old.pr.readFrame(1 << 20); err == nil {
		t.Fatal("old session still open after reinstatement")
	}
	ts.dev.mu.Lock()
	losses := ts.dev.losses
	ts.dev.mu.Unlock()
	if losses != 1 {
		t.Fatalf("NexusLoss called %d times, want 1", losses)
	}
	other.nopOut(1, true)
	if f := other.recv(); f.BHS.opcode() != opNopIn {
		t.Fatal("unrelated session affected by reinstatement")
	}
}

func TestShutdownAsksInitiatorsToLogOut(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:shut", 1)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		done <- ts.srv.Shutdown(ctx)
	}()
	f := ini.recv()
	if f.BHS.opcode() != opAsync || f.BHS[36] != 1 {
		t.Fatalf("expected Async logout request, got op %02x event %d", f.BHS.opcode(), f.BHS[36])
	}
	var h bhs
	h[0] = opLogoutReq | flagImmediate
	h[1] = flagFinal
	h.setU32(offITT, 99)
	h.setU32(offCmdSN, ini.cmdSN)
	ini.send(&h, nil)
	f = ini.recv()
	if f.BHS.opcode() != opLogoutResp || f.BHS[2] != 0 || f.BHS.itt() != 99 {
		t.Fatalf("logout response: op %02x response %d", f.BHS.opcode(), f.BHS[2])
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v (session did not end after logout)", err)
	}
}

func TestIdleConnectionIsPingedAndClosedWithoutAnswer(t *testing.T) {
	ts := startRAMServer(t, Options{NopInterval: 50 * time.Millisecond, NopTimeout: 300 * time.Millisecond})
	ini := dialTest(t, ts)
	ini.login("iqn.i:idle", 1)
	f := ini.recv()
	if f.BHS.opcode() != opNopIn || f.BHS.itt() != reservedTag || f.BHS.u32(offTTT) == reservedTag {
		t.Fatalf("expected NOP-In ping, got op %02x itt %x ttt %x", f.BHS.opcode(), f.BHS.itt(), f.BHS.u32(offTTT))
	}
	deadline := time.Now().Add(testTimeout)
	for {
		ini.c.SetReadDeadline(deadline)
		if _, err := ini.pr.readFrame(1 << 20); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("unanswered pings did not close the connection")
			}
			return
		}
	}
}

type panicDevice struct{ *ramDevice }

func (d panicDevice) Execute(cmd *scsi.Command) scsi.Result {
	if cmd.CDB[0] == 0xee {
		panic("boom")
	}
	return d.ramDevice.Execute(cmd)
}

func TestPanicInOneConnectionClosesOnlyThatConnection(t *testing.T) {
	ts := startRAMServer(t, Options{})
	tg := ts.tenant.Targets[0]
	tg.dev = panicDevice{ts.dev}
	a := dialTest(t, ts)
	a.login("iqn.i:a", 1)
	b := dialTest(t, ts)
	b.login("iqn.i:b", 1)
	a.scsi([]byte{0xee}, 0, false, false, nil, true)
	a.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := a.pr.readFrame(1 << 20); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("panicking connection not closed: %v", err)
	}
	b.scsi([]byte{0}, 0, false, false, nil, true)
	if f := b.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatal("other connection broken by a panic elsewhere")
	}
}

func TestSendTargetsListsOnlyTenantTargetsAtDialledPortal(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:disc", "SessionType=Discovery")
	ini.send(&req.BHS, req.Data)
	if f := ini.recv(); status(f.BHS) != 0 {
		t.Fatalf("discovery login: %04x", status(f.BHS))
	}
	var h bhs
	h[0] = opTextReq | flagImmediate
	h[1] = flagFinal
	h.setU32(offITT, 3)
	h.setU32(offTTT, reservedTag)
	h.setU32(offCmdSN, 1)
	ini.send(&h, []byte("SendTargets=All\x00"))
	f := ini.recv()
	want := fmt.Sprintf("TargetName=%s\x00TargetAddress=%s,1\x00", ts.iqn, ts.addr)
	if f.BHS.opcode() != opTextResp || string(f.Data) != want {
		t.Fatalf("SendTargets: %q, want %q", f.Data, want)
	}
	// SCSI commands are not allowed in a discovery session.
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opReject {
		t.Fatalf("SCSI command in discovery session: op %02x, want Reject", f.BHS.opcode())
	}
}

func TestPortalAddressBracketsIPv6(t *testing.T) {
	if got := portalAddr(&net.TCPAddr{IP: net.ParseIP("fd00::1"), Port: 3260}); got != "[fd00::1]:3260" {
		t.Fatal(got)
	}
	if got := portalAddr(&net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 3260}); got != "10.0.0.1:3260" {
		t.Fatal(got)
	}
}

func TestHeaderAndDataDigestsProtectFullFeaturePDUs(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	resp := ini.login("iqn.i:crc", 1, "HeaderDigest=CRC32C,None", "DataDigest=CRC32C,None", "ImmediateData=Yes")
	a := answers(t, resp.Data)
	if a["HeaderDigest"] != "CRC32C" || a["DataDigest"] != "CRC32C" {
		t.Fatalf("digests not negotiated: %v", a)
	}
	ini.pr.headerDigest, ini.pr.dataDigest = true, true
	data := bytes.Repeat([]byte{0xc3, 0x3c}, 512)
	ini.scsi(cdb10(0x2a, 8, 2), 1024, false, true, data, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatalf("write with digests: op %02x status %d", f.BHS.opcode(), f.BHS[3])
	}
	ini.scsi(cdb10(0x28, 8, 2), 1024, true, false, nil, true)
	f := ini.recv() // readFrame verifies both digests
	if !bytes.Equal(f.Data, data) {
		t.Fatal("read with digests returned other data")
	}
	// A corrupted data digest is answered with a Reject (data digest error).
	var h bhs
	h[0] = opNopOut | flagImmediate
	h[1] = flagFinal
	h.setU32(offITT, 77)
	h.setU32(offTTT, reservedTag)
	h.setU32(offCmdSN, ini.cmdSN)
	wire := appendPDU(nil, &h, nil, []byte("abcd"), true, true)
	wire[len(wire)-1] ^= 0xff
	ini.c.Write(wire)
	if f := ini.recv(); f.BHS.opcode() != opReject || f.BHS[2] != rejectDataDigest {
		t.Fatalf("bad data digest: op %02x reason %d", f.BHS.opcode(), f.BHS[2])
	}
}

func TestSlowCommandDoesNotBlockLaterOnes(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ts.dev.slowLBA = 9
	ts.dev.gate = make(chan struct{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:slow", 1)
	// A command slower than the inline threshold teaches the connection that commands can
	// be slow.
	ini.scsi(cdb10(0x28, 9, 1), 512, true, false, nil, true)
	ini.recv()
	// This one blocks in the device until the fast one has been answered: if the fast one
	// waited behind it, neither would ever be answered.
	slow := ini.scsi(cdb10(0x28, 11, 1), 512, true, false, nil, true)
	fast := ini.scsi(cdb10(0x28, 10, 1), 512, true, false, nil, true)
	if f := ini.recv(); f.BHS.itt() != fast {
		t.Fatalf("first answer is ITT %d, want the fast command %d", f.BHS.itt(), fast)
	}
	close(ts.dev.gate)
	if f := ini.recv(); f.BHS.itt() != slow {
		t.Fatalf("second answer ITT %d, want %d", f.BHS.itt(), slow)
	}
}

func TestManyConcurrentCommandsKeepDataIntact(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ts.dev.delay = 300 * time.Microsecond // slow enough that commands run on their own goroutines
	ini := dialTest(t, ts)
	ini.login("iqn.i:many", 1, "ImmediateData=Yes", "InitialR2T=No")
	const n = 128
	for i := 0; i < n; i++ {
		blk := bytes.Repeat([]byte{byte(i)}, 4096)
		ini.scsi(cdb10(0x2a, uint32(i*8), 8), 4096, false, true, blk, true)
	}
	for i := 0; i < n; i++ {
		if f := ini.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
			t.Fatalf("write %d: op %02x status %d", i, f.BHS.opcode(), f.BHS[3])
		}
	}
	for i := 0; i < n; i++ {
		ini.scsi(cdb10(0x28, uint32(i*8), 8), 4096, true, false, nil, true)
	}
	seen := map[uint32]bool{}
	for i := 0; i < n; i++ {
		f := ini.recv()
		idx := f.BHS.itt() - uint32(n) - 1
		if f.BHS.opcode() != opDataIn || len(f.Data) != 4096 || f.Data[0] != byte(idx) || f.Data[4095] != byte(idx) {
			t.Fatalf("read %d: op %02x len %d first byte %d", idx, f.BHS.opcode(), len(f.Data), f.Data[0])
		}
		seen[idx] = true
	}
	if len(seen) != n {
		t.Fatalf("%d distinct reads answered, want %d", len(seen), n)
	}
}

// serveTenantB adds tenant t2b to ts's server, with a target of the same IQN on its own RAM
// device, served on a listener of its own (as another namespace's portal would be).
func serveTenantB(t *testing.T, ts *testServer) (*Tenant, *testServer) {
	t.Helper()
	tenantB := ts.srv.NewTenant("t2b", Limits{})
	tenantB.Targets = []*Target{newTarget(TargetConfig{IQN: ts.iqn}, newRAMDevice(1<<20))}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go ts.srv.ServeConn(context.Background(), c, tenantB)
		}
	}()
	return tenantB, &testServer{addr: ln.Addr().String()}
}

func TestSameIQNInTwoTenantsServesEachTenantItsOwnLUN(t *testing.T) {
	ts := startRAMServer(t, Options{})
	_, tsB := serveTenantB(t, ts)
	a := dialTest(t, ts)
	a.login("iqn.i:same-name", 1)
	b := dialTest(t, tsB)
	b.login("iqn.i:same-name", 1) // same initiator+ISID+IQN, other tenant: not a reinstatement
	a.scsi(cdb10(0x2a, 0, 1), 512, false, true, bytes.Repeat([]byte{0xaa}, 512), true)
	if f := a.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatal("write in tenant A failed")
	}
	b.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	f := b.recv()
	if f.BHS.opcode() != opDataIn || !bytes.Equal(f.Data, make([]byte, 512)) {
		t.Fatalf("tenant B sees tenant A's data: % x", f.Data[:8])
	}
	a.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	if f := a.recv(); !bytes.Equal(f.Data, bytes.Repeat([]byte{0xaa}, 512)) {
		t.Fatal("tenant A lost its data (session killed by B's login?)")
	}
}

// waitUsage waits until tenant's holdings are want (they go back when connections end).
func waitUsage(t *testing.T, srv *Server, tenant string, want Usage) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		got := srv.Stats().Tenants[tenant]
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tenant %s holds %+v, want %+v", tenant, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// reset ends the connection with a TCP RST, as a crashed or hostile initiator does.
func (ini *testInitiator) reset() {
	ini.c.(*net.TCPConn).SetLinger(0)
	ini.c.Close()
}

func TestAbandonedWritesGiveTheirBuffersBackWhenTheConnectionIsReset(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:abandon", 1, "InitialR2T=Yes", "ImmediateData=No")
	for i := range 4 {
		ini.scsi(cdb10(0x2a, uint32(i)*8192, 8192), 4<<20, false, true, nil, true)
		if f := ini.recv(); f.BHS.opcode() != opR2T {
			t.Fatalf("expected R2T, got 0x%02x", f.BHS.opcode())
		}
	}
	if u := ts.srv.Stats().Tenants["t1"]; u.BufferBytes < 16<<20 || u.Commands < 4 {
		t.Fatalf("pending WRITEs hold %+v", u)
	}
	ini.reset()
	waitUsage(t, ts.srv, "t1", Usage{})
	if u := ts.srv.Stats().Total; u != (Usage{}) {
		t.Fatalf("server still holds %+v", u)
	}
}

func TestReinstatementGivesBackWhatTheOldSessionHeld(t *testing.T) {
	ts := startRAMServer(t, Options{})
	old := dialTest(t, ts)
	old.login("iqn.i:reinstate", 3, "InitialR2T=Yes", "ImmediateData=No")
	old.scsi(cdb10(0x2a, 0, 8192), 4<<20, false, true, nil, true)
	old.recv() // R2T: the WRITE waits for data it will never get
	nu := dialTest(t, ts)
	nu.login("iqn.i:reinstate", 3)
	waitUsage(t, ts.srv, "t1", Usage{Connections: 1, Sessions: 1})
	nu.scsi([]byte{0}, 0, false, false, nil, true)
	if f := nu.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[offStatus] != 0 {
		t.Fatal("new session does not work")
	}
}

func TestConnectionsBeyondTheTenantLimitAreClosedAndOtherTenantsStillConnect(t *testing.T) {
	ts := startRAMServerLimited(t, Options{}, Limits{Connections: 2})
	a, b := dialTest(t, ts), dialTest(t, ts)
	a.login("iqn.i:a", 1)
	b.login("iqn.i:b", 1)
	extra := dialTest(t, ts)
	extra.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := extra.c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a connection beyond the tenant's limit was kept open")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("a connection beyond the tenant's limit was neither served nor closed")
	}
	// Another tenant (same server, own listener) is not affected.
	other := ts.srv.NewTenant("t3", Limits{})
	other.Targets = []*Target{newTarget(TargetConfig{IQN: ts.iqn}, newRAMDevice(1<<20))}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err == nil {
			ts.srv.ServeConn(context.Background(), c, other)
		}
	}()
	o := dialTest(t, &testServer{addr: ln.Addr().String()})
	o.login("iqn.i:o", 1)
	a.scsi([]byte{0}, 0, false, false, nil, true)
	if f := a.recv(); f.BHS.opcode() != opSCSIResp {
		t.Fatal("existing connection broken by the refused one")
	}
}

func TestPeerThatNeverReadsIsClosedWithBoundedMemory(t *testing.T) {
	ts := startRAMServer(t, Options{NopInterval: 20 * time.Millisecond, NopTimeout: 100 * time.Millisecond})
	ini := dialTest(t, ts)
	ini.login("iqn.i:deaf", 1, "MaxRecvDataSegmentLength=262144")
	ini.c.(*net.TCPConn).SetReadBuffer(4096)
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	ping := make([]byte, 256<<10)
	var h bhs
	h[0] = opNopOut | flagImmediate
	h[1] = flagFinal
	h.setU32(offTTT, reservedTag)
	// 256 MiB of pings whose echoes are never read: the server must stop reading, then give
	// up on the connection.
	ini.c.SetWriteDeadline(time.Now().Add(testTimeout))
	var werr error
	for i := range 1024 {
		h.setU32(offITT, uint32(i))
		if _, werr = ini.c.Write(appendPDU(nil, &h, nil, ping, false, false)); werr != nil {
			break
		}
	}
	if werr == nil {
		t.Fatal("the server read 256 MiB of pings from a peer that reads nothing")
	}
	if ne, ok := werr.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the server did not close a peer that reads nothing: %v", werr)
	}
	waitUsage(t, ts.srv, "t1", Usage{})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 64<<20 {
		t.Fatalf("heap grew by %d MiB", grew>>20)
	}
}

func TestSessionsListsWhoIsAttachedAndWhatTheyDid(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:status", 5, "ImmediateData=Yes")
	ini.scsi(cdb10(0x2a, 0, 2), 1024, false, true, make([]byte, 1024), true)
	ini.recv()
	ini.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	ini.recv()
	if got := ts.srv.Sessions("t2"); len(got) != 0 {
		t.Fatalf("another tenant lists %d sessions", len(got))
	}
	got := ts.srv.Sessions("")
	if len(got) != 1 {
		t.Fatalf("%d sessions listed, want 1", len(got))
	}
	s := got[0]
	if s.Tenant != "t1" || s.Initiator != "iqn.i:status" || s.Target != ts.iqn || s.ISID != "800102030405" ||
		s.TSIH == 0 || s.Remote != ini.c.LocalAddr().String() || s.Since.IsZero() {
		t.Fatalf("session %+v", s)
	}
	if s.Commands != 2 || s.ReadBytes != 512 || s.WrittenBytes != 1024 {
		t.Fatalf("counters: %d commands, %d read, %d written", s.Commands, s.ReadBytes, s.WrittenBytes)
	}
}

func TestAllowListChangeEndsOnlySessionsNoLongerAllowed(t *testing.T) {
	ts := startRAMServer(t, Options{})
	keep, drop := dialTest(t, ts), dialTest(t, ts)
	keep.login("iqn.i:keep", 1)
	drop.login("iqn.i:drop", 2)
	ts.srv.SetInitiators(ts.tenant.Targets[0], []string{"iqn.i:keep"})
	drop.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := drop.pr.readFrame(1 << 20); err == nil {
		t.Fatal("a session no longer allowed was kept")
	}
	keep.scsi([]byte{0}, 0, false, false, nil, true)
	if f := keep.recv(); f.BHS.opcode() != opSCSIResp {
		t.Fatal("an allowed session was disturbed")
	}
	again := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:drop", "TargetName="+ts.iqn)
	again.send(&req.BHS, req.Data)
	if f := again.recv(); status(f.BHS) != loginAuthorizationFail {
		t.Fatalf("login of a removed initiator: status %04x", status(f.BHS))
	}
}

func TestCloseTenantAsksSessionsToLogOutAndGivesEverythingBack(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:retire", 1)
	done := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		ts.srv.CloseTenant(ctx, ts.tenant)
		close(done)
	}()
	if f := ini.recv(); f.BHS.opcode() != opAsync || f.BHS[offAsyncEvent] != asyncLogoutRequest {
		t.Fatalf("expected an Async logout request, got 0x%02x", f.BHS.opcode())
	}
	var h bhs
	h[0] = opLogoutReq | flagImmediate
	h[1] = flagFinal
	h.setU32(offITT, 9)
	h.setU32(offCmdSN, ini.cmdSN)
	ini.send(&h, nil)
	if f := ini.recv(); f.BHS.opcode() != opLogoutResp {
		t.Fatalf("expected a Logout Response, got 0x%02x", f.BHS.opcode())
	}
	<-done
	if _, ok := ts.srv.Stats().Tenants["t1"]; ok {
		t.Fatal("closed tenant still listed")
	}
	if u := ts.srv.Stats().Total; u != (Usage{}) {
		t.Fatalf("server holds %+v after the tenant closed", u)
	}
	refused := dialTest(t, ts)
	refused.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := refused.c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a closed tenant accepted a connection")
	}
}

func TestMetricsCountPerLUNAndLoginsAndLatency(t *testing.T) {
	ts := startRAMServer(t, Options{})
	// The RAM target has no LUN map, so give the tenant a target that has one.
	lunDev := newRAMDevice(1 << 20)
	tg := newTarget(TargetConfig{IQN: "iqn.2026-01.test.nstarget:metrics", LUNs: map[uint64]*scsi.LU{0: nil}}, lunDev)
	ts.srv.SetTargets(ts.tenant, append(slices.Clone(ts.tenant.targets()), tg))
	ini := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:m", "TargetName=iqn.2026-01.test.nstarget:metrics", "ImmediateData=Yes")
	req.BHS.setU32(offCmdSN, ini.cmdSN)
	ini.send(&req.BHS, req.Data)
	if f := ini.recv(); status(f.BHS) != 0 {
		t.Fatalf("login: %04x", status(f.BHS))
	}
	ini.statSN = 1
	ini.scsi(cdb10(0x2a, 0, 2), 1024, false, true, make([]byte, 1024), true)
	ini.recv()
	ini.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	ini.recv()
	bad := dialTest(t, ts)
	req = loginReq(1, 3, true, false, "InitiatorName=iqn.i:m", "TargetName=iqn.nosuch:x")
	bad.send(&req.BHS, req.Data)
	bad.recv()
	var m TenantMetrics
	for _, x := range ts.srv.Metrics() {
		if x.Name == "t1" {
			m = x
		}
	}
	if len(m.LUNs) != 1 || m.LUNs[0].Commands != 2 || m.LUNs[0].ReadBytes != 512 || m.LUNs[0].WrittenBytes != 1024 {
		t.Fatalf("LUN counters %+v", m.LUNs)
	}
	if m.LoginsOK != 1 {
		t.Fatalf("logins ok %d, want 1", m.LoginsOK)
	}
	waitFor := time.Now().Add(testTimeout)
	for ts.srv.Metrics()[0].LoginsFailed == 0 && time.Now().Before(waitFor) {
		time.Sleep(5 * time.Millisecond) // the refused connection ends after its response
	}
	if m := ts.srv.Metrics()[0]; m.LoginsFailed != 1 || m.LatencyCount != 2 || m.LatencyBuckets[len(m.LatencyBuckets)-1] != 2 {
		t.Fatalf("logins failed %d, latency count %d buckets %v", m.LoginsFailed, m.LatencyCount, m.LatencyBuckets)
	}
}
