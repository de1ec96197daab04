package target

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"sync"
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

// expectSilence asserts nothing arrives within d.
func (ini *testInitiator) expectSilence(d time.Duration) {
	ini.t.Helper()
	ini.c.SetReadDeadline(time.Now().Add(d))
	f, err := ini.pr.readFrame(1 << 24)
	if err == nil {
		ini.t.Fatalf("unexpected PDU opcode 0x%02x", f.BHS.opcode())
	}
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		ini.t.Fatalf("connection failed instead of staying silent: %v", err)
	}
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
	var h bhs
	h[0] = opSCSICmd
	if final {
		h[1] = flagFinal
	}
	if read {
		h[1] |= flagRead
	}
	if write {
		h[1] |= flagWrite
	}
	h.setU32(offITT, ini.itt)
	h.setU32(offTTT, edtl)
	h.setU32(offCmdSN, ini.cmdSN)
	h.setU32(offExpStatSN, ini.statSN)
	copy(h[32:], cdb)
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

func cdb10(op byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

func TestNopOutWithImmediateBitDoesNotAdvanceCmdSN(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:nop", 1)
	start := ini.cmdSN
	for i := 0; i < 3; i++ {
		ini.nopOut(100+uint32(i), true)
		f := ini.recv()
		if f.BHS.opcode() != opNopIn || f.BHS.itt() != 100+uint32(i) || string(f.Data) != "ping" {
			t.Fatalf("NOP-In: op %02x itt %d data %q", f.BHS.opcode(), f.BHS.itt(), f.Data)
		}
		if f.BHS.u32(offExpStatSN) != start {
			t.Fatalf("immediate NOP-Out moved ExpCmdSN to %d (want %d)", f.BHS.u32(offExpStatSN), start)
		}
	}
	// The next command uses the CmdSN the pings did not consume and is answered.
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	f := ini.recv()
	if f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 || f.BHS.u32(offExpStatSN) != start+1 {
		t.Fatalf("TUR after pings: op %02x status %d ExpCmdSN %d", f.BHS.opcode(), f.BHS[3], f.BHS.u32(offExpStatSN))
	}
	// A non-immediate NOP-Out does consume one.
	ini.nopOut(200, false)
	if f := ini.recv(); f.BHS.u32(offExpStatSN) != start+2 {
		t.Fatalf("non-immediate NOP-Out: ExpCmdSN %d, want %d", f.BHS.u32(offExpStatSN), start+2)
	}
}

func TestCommandOutsideWindowIsSilentlyIgnored(t *testing.T) {
	ts := startRAMServer(t, Options{QueueDepth: 4})
	ini := dialTest(t, ts)
	resp := ini.login("iqn.i:win", 1)
	if resp.BHS.u32(offMaxCmdSN) != ini.cmdSN+3 {
		t.Fatalf("MaxCmdSN %d, want %d", resp.BHS.u32(offMaxCmdSN), ini.cmdSN+3)
	}
	good := ini.cmdSN
	ini.cmdSN = good + 4 // MaxCmdSN+1
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	ini.cmdSN = good - 1
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	ini.expectSilence(300 * time.Millisecond)
	ini.cmdSN = good
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatalf("in-window command after ignored ones: op %02x", f.BHS.opcode())
	}
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

func TestReadResidualsFollowCDBAgainstExpectedLength(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:res", 1)
	// CDB wants 2 blocks, initiator expects 1: overflow of 512, only 512 bytes sent.
	ini.scsi(cdb10(0x28, 0, 2), 512, true, false, nil, true)
	f := ini.recv()
	if f.BHS.opcode() != opDataIn || len(f.Data) != 512 || f.BHS[1]&0x05 != 0x05 || f.BHS.u32(offResidual) != 512 {
		t.Fatalf("overflow: op %02x len %d flags %02x residual %d", f.BHS.opcode(), len(f.Data), f.BHS[1], f.BHS.u32(offResidual))
	}
	// CDB wants 1 block, initiator expects 10000 bytes: underflow of 9488.
	ini.scsi(cdb10(0x28, 0, 1), 10000, true, false, nil, true)
	f = ini.recv()
	if len(f.Data) != 512 || f.BHS[1]&0x03 != 0x03 || f.BHS.u32(offResidual) != 9488 {
		t.Fatalf("underflow: len %d flags %02x residual %d", len(f.Data), f.BHS[1], f.BHS.u32(offResidual))
	}
	// Error status goes in a SCSI Response with sense behind a 2-byte length.
	ini.scsi(cdb10(0x28, 0xffffff, 1), 512, true, false, nil, true)
	f = ini.recv()
	if f.BHS.opcode() != opSCSIResp || f.BHS[3] != 2 || len(f.Data) < 2+14 || binary.BigEndian.Uint16(f.Data) != uint16(len(f.Data)-2) {
		t.Fatalf("check condition: op %02x status %d data % x", f.BHS.opcode(), f.BHS[3], f.Data)
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

func TestAbortTaskWaitingForDataDropsIt(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:abort", 1, "InitialR2T=Yes", "ImmediateData=No")
	itt := ini.scsi(cdb10(0x2a, 0, 8), 4096, false, true, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opR2T {
		t.Fatalf("expected R2T, got %02x", f.BHS.opcode())
	}
	var h bhs
	h[0] = opTMFReq | flagImmediate
	h[1] = flagFinal | tmfAbortTask
	h.setU32(offITT, 500)
	h.setU32(offTTT, itt)
	h.setU32(offCmdSN, ini.cmdSN)
	ini.send(&h, nil)
	f := ini.recv()
	if f.BHS.opcode() != opTMFResp || f.BHS[2] != tmrComplete {
		t.Fatalf("abort: op %02x response %d", f.BHS.opcode(), f.BHS[2])
	}
	h.setU32(offITT, 501)
	ini.send(&h, nil)
	if f := ini.recv(); f.BHS[2] != tmrNoTask {
		t.Fatalf("second abort of same task: response %d, want task does not exist", f.BHS[2])
	}
	h[1] = flagFinal | tmfClearACA
	h.setU32(offITT, 502)
	ini.send(&h, nil)
	if f := ini.recv(); f.BHS[2] != tmrFunctionNotSupp {
		t.Fatalf("CLEAR ACA: response %d, want function not supported", f.BHS[2])
	}
	h[1] = flagFinal | tmfLUNReset
	h.setU32(offITT, 503)
	ini.send(&h, nil)
	if f := ini.recv(); f.BHS[2] != tmrComplete {
		t.Fatalf("LUN RESET: response %d", f.BHS[2])
	}
	h[1] = flagFinal | tmfTargetWarmReset
	h.setU32(offITT, 504)
	ini.send(&h, nil)
	if f := ini.recv(); f.BHS[2] != tmrComplete {
		t.Fatalf("TARGET WARM RESET: response %d", f.BHS[2])
	}
	ts.dev.mu.Lock()
	resets := ts.dev.resets
	ts.dev.mu.Unlock()
	if resets != 2 {
		t.Fatalf("device saw %d resets, want 2 (LUN + target)", resets)
	}
	// The window slot of the aborted write was released: a command still fits.
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp {
		t.Fatalf("command after abort: op %02x", f.BHS.opcode())
	}
}

func TestAbortOfRunningCommandIsAnsweredOnlyAfterItEnds(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ts.dev.slowLBA = 9
	hold := make(chan struct{})
	var release sync.Once
	// Runs before the server's cleanup: a failing run must not leave the write held.
	t.Cleanup(func() { release.Do(func() { close(hold) }) })
	ts.dev.hold = hold
	ini := dialTest(t, ts)
	ini.login("iqn.i:abort-running", 1, "ImmediateData=Yes", "InitialR2T=No")
	ini.scsi(cdb10(0x28, 9, 1), 512, true, false, nil, true) // teaches: commands are slow
	ini.recv()
	w := ini.scsi(cdb10(0x2a, 0, 1), 512, false, true, bytes.Repeat([]byte{0x5a}, 512), true)
	var h bhs
	h[0] = opTMFReq | flagImmediate
	h[1] = flagFinal | tmfAbortTask
	h.setU32(offITT, 900)
	h.setU32(offTTT, w)
	h.setU32(offCmdSN, ini.cmdSN)
	ini.send(&h, nil)
	// The WRITE is still executing (held): "function complete" now would let the initiator
	// reuse the range while the old write can still land.
	ini.expectSilence(300 * time.Millisecond)
	release.Do(func() { close(hold) })
	f := ini.recv()
	if f.BHS.opcode() != opTMFResp || f.BHS.itt() != 900 || f.BHS[2] != tmrComplete {
		t.Fatalf("after the write ended: op %02x itt %d response %d, want TMF response complete",
			f.BHS.opcode(), f.BHS.itt(), f.BHS[2])
	}
	// The aborted task's own response is never sent, and its window slot is free again.
	ini.nopOut(1, true)
	if f := ini.recv(); f.BHS.opcode() != opNopIn {
		t.Fatalf("after abort: op %02x itt %d, want only the NOP-In", f.BHS.opcode(), f.BHS.itt())
	}
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp || f.BHS.itt() != ini.itt {
		t.Fatalf("command after abort: op %02x itt %d", f.BHS.opcode(), f.BHS.itt())
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

func TestUnknownOpcodeIsRejectedAndConnectionSurvives(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:rej", 1)
	var h bhs
	h[0] = 0x1c
	h[1] = flagFinal
	ini.send(&h, []byte("xx"))
	f := ini.recv()
	if f.BHS.opcode() != opReject || f.BHS[2] != rejectNotSupported || !bytes.Equal(f.Data[:1], []byte{0x1c}) {
		t.Fatalf("reject: op %02x reason %d", f.BHS.opcode(), f.BHS[2])
	}
	ini.scsi([]byte{0}, 0, false, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp {
		t.Fatal("connection unusable after reject")
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
	ini := dialTest(t, ts)
	ini.login("iqn.i:slow", 1)
	// The first slow command teaches the connection that commands can be slow.
	ini.scsi(cdb10(0x28, 9, 1), 512, true, false, nil, true)
	ini.recv()
	slow := ini.scsi(cdb10(0x28, 9, 1), 512, true, false, nil, true)
	fast := ini.scsi(cdb10(0x28, 10, 1), 512, true, false, nil, true)
	if f := ini.recv(); f.BHS.itt() != fast {
		t.Fatalf("first answer is ITT %d; the fast command %d waited behind the slow %d", f.BHS.itt(), fast, slow)
	}
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

func TestTextRequestAndAnswerSpanSeveralPDUs(t *testing.T) {
	ts := startRAMServer(t, Options{})
	for i := 0; i < 20; i++ {
		tg, err := ts.srv.newTarget(TargetConfig{IQN: fmt.Sprintf("iqn.2026-01.test.nstarget:a-rather-long-target-name-number-%02d", i)}, newRAMDevice(4096))
		if err != nil {
			t.Fatal(err)
		}
		ts.tenant.Targets = append(ts.tenant.Targets, tg)
	}
	ini := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:disc", "SessionType=Discovery", "MaxRecvDataSegmentLength=512")
	ini.send(&req.BHS, req.Data)
	if f := ini.recv(); status(f.BHS) != 0 {
		t.Fatalf("discovery login: %04x", status(f.BHS))
	}
	text := func(flags byte, ttt uint32, data string) *frame {
		var h bhs
		h[0] = opTextReq | flagImmediate
		h[1] = flags
		h.setU32(offITT, 4)
		h.setU32(offTTT, ttt)
		h.setU32(offCmdSN, 1)
		ini.send(&h, []byte(data))
		return ini.recv()
	}
	f := text(flagContinue, reservedTag, "SendTar")
	if f.BHS.opcode() != opTextResp || len(f.Data) != 0 || f.BHS[1]&flagFinal != 0 || f.BHS.u32(offTTT) == reservedTag {
		t.Fatalf("ack of partial request: flags %02x ttt %x data %q", f.BHS[1], f.BHS.u32(offTTT), f.Data)
	}
	f = text(flagFinal, f.BHS.u32(offTTT), "gets=All\x00")
	var all []byte
	pdus := 1
	for {
		if len(f.Data) > 512 {
			t.Fatalf("text PDU of %d bytes exceeds initiator's 512", len(f.Data))
		}
		all = append(all, f.Data...)
		if f.BHS[1]&flagFinal != 0 {
			break
		}
		if f.BHS[1]&flagContinue == 0 || f.BHS.u32(offTTT) == reservedTag {
			t.Fatalf("non-final answer without C bit / TTT: flags %02x", f.BHS[1])
		}
		f = text(flagFinal, f.BHS.u32(offTTT), "")
		pdus++
	}
	kvs, _, err := parseTextKeys(all, false)
	if err != nil || len(kvs) != 2*21 || pdus < 3 {
		t.Fatalf("SendTargets answer: %d pairs in %d PDUs, err %v", len(kvs), pdus, err)
	}
}

func TestCloseTargetEndsSessionsAndRefusesLogins(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	ini.login("iqn.i:ct", 1)
	ts.srv.CloseTarget(ts.tenant.Targets[0])
	ini.c.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := ini.pr.readFrame(1 << 20); err == nil {
		t.Fatal("session survived CloseTarget")
	}
	again := dialTest(t, ts)
	req := loginReq(1, 3, true, false, "InitiatorName=iqn.i:ct", "TargetName="+ts.iqn)
	again.send(&req.BHS, req.Data)
	if f := again.recv(); status(f.BHS) != loginNotFound {
		t.Fatalf("login to closed target: status %04x, want %04x", status(f.BHS), loginNotFound)
	}
}

func TestSameIQNInTwoTenantsServesEachTenantItsOwnLUN(t *testing.T) {
	ts := startRAMServer(t, Options{})
	devB := newRAMDevice(1 << 20)
	tgB, err := ts.srv.newTarget(TargetConfig{IQN: ts.iqn}, devB)
	if err != nil {
		t.Fatal(err)
	}
	tenantB := &Tenant{Name: "t2", Targets: []*Target{tgB}}
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
	a := dialTest(t, ts)
	a.login("iqn.i:same-name", 1)
	b := dialTest(t, &testServer{addr: ln.Addr().String()})
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

func TestOversizedAndExcessImmediateCommandsAreRefused(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ts.dev.slowLBA = 9
	ini := dialTest(t, ts)
	ini.login("iqn.i:limits", 1)
	// An expected length beyond what one command may pin: CHECK CONDITION, nothing allocated.
	ini.scsi(cdb10(0x28, 0, 1), 128<<20, true, false, nil, true)
	if f := ini.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 2 {
		t.Fatalf("128 MiB EDTL: op %02x status %d", f.BHS.opcode(), f.BHS[3])
	}
	ini.scsi(cdb10(0x28, 9, 1), 512, true, false, nil, true) // teaches: commands are slow
	ini.recv()
	// Immediate commands bypass the window; more than maxImmediate at once are rejected.
	for i := 0; i < maxImmediate+1; i++ {
		ini.itt++
		var h bhs
		h[0] = opSCSICmd | flagImmediate
		h[1] = flagFinal | flagRead
		h.setU32(offITT, ini.itt)
		h.setU32(offTTT, 512)
		h.setU32(offCmdSN, ini.cmdSN)
		copy(h[32:], cdb10(0x28, 9, 1))
		ini.send(&h, nil)
	}
	rejects, data := 0, 0
	for i := 0; i < maxImmediate+1; i++ {
		switch f := ini.recv(); f.BHS.opcode() {
		case opReject:
			if f.BHS[2] != rejectImmediate {
				t.Fatalf("reject reason %d", f.BHS[2])
			}
			rejects++
		case opDataIn:
			data++
		}
	}
	if rejects != 1 || data != maxImmediate {
		t.Fatalf("%d rejected, %d answered; want 1 and %d", rejects, data, maxImmediate)
	}
}

func TestServerWideBufferBudgetAnswersTaskSetFull(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ts.srv.bufBudget = 8192 // far below one connection's budget: only the server-wide one can refuse
	a := dialTest(t, ts)
	a.login("iqn.i:budget-a", 1, "InitialR2T=Yes", "ImmediateData=No")
	b := dialTest(t, ts)
	b.login("iqn.i:budget-b", 1, "InitialR2T=Yes", "ImmediateData=No")
	// A's write waits for its data and holds 4 KiB of the 8 KiB.
	wa := a.scsi(cdb10(0x2a, 0, 8), 4096, false, true, nil, true)
	r2t := a.recv()
	if r2t.BHS.opcode() != opR2T {
		t.Fatalf("A: expected R2T, got op %02x", r2t.BHS.opcode())
	}
	b.scsi(cdb10(0x2a, 100, 16), 8192, false, true, nil, true)
	if f := b.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != scsi.StatusTaskSetFull {
		t.Fatalf("B over the server budget: op %02x status 0x%02x, want SCSI Response TASK SET FULL",
			f.BHS.opcode(), f.BHS[3])
	}
	a.dataOut(wa, r2t.BHS.u32(offTTT), 0, 0, bytes.Repeat([]byte{1}, 4096), true)
	if f := a.recv(); f.BHS.opcode() != opSCSIResp || f.BHS[3] != 0 {
		t.Fatalf("A's write: op %02x status 0x%02x", f.BHS.opcode(), f.BHS[3])
	}
	// A's buffer comes back once its response is written (the writer recycles the task just
	// after the write, so an immediate retry may still see the budget full): B's retry fits.
	for deadline := time.Now().Add(testTimeout); ; {
		b.scsi(cdb10(0x2a, 100, 16), 8192, false, true, nil, true)
		f := b.recv()
		if f.BHS.opcode() == opR2T {
			break
		}
		if f.BHS.opcode() != opSCSIResp || f.BHS[3] != scsi.StatusTaskSetFull || time.Now().After(deadline) {
			t.Fatalf("B's retry after A finished: op %02x status 0x%02x, want R2T", f.BHS.opcode(), f.BHS[3])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReadOfExactly64DataInPDUsEndsWithStatus(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	// 4 KiB PDUs: a 256 KiB read is 64 Data-In PDUs, exactly one queueing batch.
	ini.login("iqn.i:batch", 1, "MaxRecvDataSegmentLength=4096")
	itt := ini.scsi(cdb10(0x28, 0, 512), 256<<10, true, false, nil, true)
	for i := 0; i < 64; i++ {
		f := ini.recv()
		if f.BHS.opcode() != opDataIn || f.BHS.itt() != itt || f.BHS.u32(offDataSN) != uint32(i) || len(f.Data) != 4096 {
			t.Fatalf("PDU %d: op %02x itt %d DataSN %d len %d", i, f.BHS.opcode(), f.BHS.itt(), f.BHS.u32(offDataSN), len(f.Data))
		}
		if last := i == 63; (f.BHS.flags()&0x01 != 0) != last {
			t.Fatalf("PDU %d: S bit %v, want it on the last PDU only", i, !last)
		}
	}
	ini.nopOut(7, true)
	if f := ini.recv(); f.BHS.opcode() != opNopIn {
		t.Fatalf("connection after the read: op %02x", f.BHS.opcode())
	}
}

func TestDataInSequencesNeverExceedMaxBurstLength(t *testing.T) {
	ts := startRAMServer(t, Options{})
	ini := dialTest(t, ts)
	// Neither length divides the other: PDUs must be cut at every burst boundary.
	ini.login("iqn.i:burst", 1, "MaxRecvDataSegmentLength=4096", "MaxBurstLength=6000")
	const total = 16 << 10
	itt := ini.scsi(cdb10(0x28, 0, total/512), total, true, false, nil, true)
	var off, seq uint32
	for off < total {
		f := ini.recv()
		if f.BHS.opcode() != opDataIn || f.BHS.itt() != itt || f.BHS.u32(offBufOffset) != off {
			t.Fatalf("op %02x itt %d offset %d, want Data-In at %d", f.BHS.opcode(), f.BHS.itt(), f.BHS.u32(offBufOffset), off)
		}
		n := uint32(len(f.Data))
		off += n
		seq += n
		if seq > 6000 {
			t.Fatalf("Data-In sequence of %d bytes exceeds MaxBurstLength 6000 (PDU ending at %d)", seq, off)
		}
		final := f.BHS.flags()&flagFinal != 0
		if want := off == total || off%6000 == 0; final != want {
			t.Fatalf("PDU ending at %d: F=%v, want %v", off, final, want)
		}
		if final {
			seq = 0
		}
	}
}
