package scsi

import (
	"encoding/binary"
	"testing"

	"nstarget/backend"
)

// Space lets the LBP log page see through the counting wrapper to the pool.
func (c *countingVolume) Space() (backend.Space, error) {
	return c.Volume.(backend.SpaceReporter).Space()
}

var tur = []byte{opTestUnitReady, 0, 0, 0, 0, 0}

func reportLUNs(d *Device, n *Nexus) (Result, []uint64) {
	cmd := &Command{Nexus: n, CDB: []byte{opReportLUNs, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, ExpectedLen: 256, DataIn: make([]byte, 256)}
	r := d.Execute(cmd)
	var luns []uint64
	for i := 8; i+8 <= 8+int(binary.BigEndian.Uint32(cmd.DataIn)) && i+8 <= r.DataInLen; i += 8 {
		luns = append(luns, DecodeLUN(binary.BigEndian.Uint64(cmd.DataIn[i:])))
	}
	return r, luns
}

func (f *fixture) execLUN(d *Device, n *Nexus, lun uint64, cdb []byte, expLen int) Result {
	cmd := &Command{Nexus: n, LUN: lun, CDB: cdb, ExpectedLen: uint32(expLen), DataIn: make([]byte, expLen)}
	return d.Execute(cmd)
}

func TestLUNAddedAndRemovedLiveTellsEveryAttachedSessionOnce(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	d := NewDevice(map[uint64]*LU{0: f.lu})
	d.Attach(nexusA)
	d.Attach(nexusB) // logged in, has addressed nothing yet
	f.expectGood(f.execLUN(d, nexusA, 0, tur, 0), "TUR before the change")

	pool, err := backend.OpenPool(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	v, err := pool.Open("lu1", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	lu1, err := NewLU(v, LUConfig{})
	if err != nil {
		t.Fatal(err)
	}
	d.SetLUNs(map[uint64]*LU{0: f.lu, 1: lu1})

	for _, n := range []*Nexus{nexusA, nexusB} {
		f.expectSense(f.execLUN(d, n, 0, tur, 0), SenseUnitAttention, ascReportedLUNsChanged, "first command after a LUN was added")
		// REPORT LUNS clears it on every LU of the device.
		if r, luns := reportLUNs(d, n); r.Status != StatusGood || len(luns) != 2 || luns[1] != 1 {
			t.Fatalf("REPORT LUNS after add: %#x %v", r.Status, luns)
		}
		f.expectGood(f.execLUN(d, n, 1, tur, 0), "new LUN after REPORT LUNS")
		f.expectGood(f.execLUN(d, n, 0, tur, 0), "old LUN after REPORT LUNS")
	}
	// A session that logs in after the change has nothing to hear.
	d.Attach(nexusC)
	f.expectGood(f.execLUN(d, nexusC, 1, tur, 0), "session attached after the change")

	d.SetLUNs(map[uint64]*LU{1: lu1})
	f.expectSense(f.execLUN(d, nexusA, 0, read10(0, 1), 512), SenseIllegalRequest, ascLUNotSupported, "removed LUN")
	f.expectSense(f.execLUN(d, nexusA, 1, tur, 0), SenseUnitAttention, ascReportedLUNsChanged, "remaining LUN after a removal")
	f.expectGood(f.execLUN(d, nexusA, 1, tur, 0), "the unit attention is reported once")

	// The same map again changes nothing.
	reportLUNs(d, nexusB)
	d.SetLUNs(map[uint64]*LU{1: lu1})
	f.expectGood(f.execLUN(d, nexusB, 1, tur, 0), "identical map")
	// A nexus that logged out hears nothing more and is forgotten.
	d.NexusLoss(nexusC)
	if _, ok := d.attached[nexusC.ID]; ok {
		t.Fatal("nexus still attached after NexusLoss")
	}
}

func TestVolumeGrownLiveReportsCapacityDataHasChanged(t *testing.T) {
	f := newFixture(t, LUConfig{})
	readCap := func() uint64 {
		t.Helper()
		r, d := f.run(nexusA, []byte{opServiceActionIn, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, nil, 32)
		f.expectGood(r, "READ CAPACITY 16")
		return binary.BigEndian.Uint64(d) + 1
	}
	f.clearUA(nexusA)
	if got := readCap(); got != testBlocks {
		t.Fatalf("capacity %d, want %d", got, testBlocks)
	}
	if f.lu.Resized() {
		t.Fatal("Resized reported a change with the volume unchanged")
	}
	grown := growVolume(t, f, 2*testBlocks*512)
	if !f.lu.Resized() || grown != 2*testBlocks*512 {
		t.Fatal("Resized did not see the grown volume")
	}
	r, _ := f.run(nexusA, write10(testBlocks+5, 1, 0), make([]byte, 512), 512)
	f.expectSense(r, SenseUnitAttention, ascCapacityChanged, "first command after the grow")
	if got := readCap(); got != 2*testBlocks {
		t.Fatalf("capacity %d after grow, want %d", got, 2*testBlocks)
	}
	r, _ = f.run(nexusA, write10(testBlocks+5, 1, 0), pattern(512, 7), 512)
	f.expectGood(r, "write beyond the old end")
}

func growVolume(t *testing.T, f *fixture, size int64) int64 {
	t.Helper()
	grower, ok := f.vol.Volume.(backend.Grower)
	if !ok {
		t.Fatalf("volume %T cannot grow", f.vol.Volume)
	}
	if err := grower.Grow(size); err != nil {
		t.Fatal(err)
	}
	return f.vol.Size()
}

func TestReadOnlyAndWriteCacheChangeLive(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.clearUA(nexusA)
	f.lu.SetReadOnly(true)
	r, _ := f.run(nexusA, write10(1, 1, 0), make([]byte, 512), 512)
	f.expectSense(r, SenseUnitAttention, ascModeParamsChanged, "after read_only was set")
	r, _ = f.run(nexusA, write10(1, 1, 0), make([]byte, 512), 512)
	f.expectSense(r, SenseDataProtect, ascWriteProtected, "write to a read-only LU")
	f.lu.SetReadOnly(false)
	f.clearUA(nexusA)
	r, _ = f.run(nexusA, write10(1, 1, 0), make([]byte, 512), 512)
	f.expectGood(r, "write after read_only was cleared")

	syncs := f.vol.syncs.Load()
	if err := f.lu.SetWriteCache(false); err != nil {
		t.Fatal(err)
	}
	if f.vol.syncs.Load() == syncs {
		t.Fatal("turning the write cache off did not sync what it had acknowledged")
	}
	f.expectSense(first(f.run(nexusA, tur, nil, 0)), SenseUnitAttention, ascModeParamsChanged, "after write_cache changed")
	r, d := f.run(nexusA, []byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil, 255)
	f.expectGood(r, "MODE SENSE caching page")
	if d[4+2]&0x04 != 0 {
		t.Fatalf("caching page still says WCE: % x", d)
	}
}

func TestThinProvisioningThresholdAndLogPage(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.clearUA(nexusA)
	r, d := f.run(nexusA, []byte{opInquiry, 1, vpdLBP, 0, 64, 0}, nil, 64)
	f.expectGood(r, "LBP VPD")
	if d[4] != 11 { // 1 MiB threshold sets of 512-byte blocks
		t.Fatalf("threshold exponent %d, want 11", d[4])
	}
	r, _ = f.run(nexusA, write10(0, 2048, 0), pattern(1<<20, 3), 1<<20)
	f.expectGood(r, "fill 1 MiB")
	r, d = f.run(nexusA, []byte{opLogSense, 0, 0x40 | logLBP, 0, 0, 0, 0, 0, 255, 0}, nil, 255)
	f.expectGood(r, "LOG SENSE LBP page")
	if d[0]&0x3F != logLBP || binary.BigEndian.Uint16(d[2:]) != 24 {
		t.Fatalf("LBP log page header % x", d[:4])
	}
	if code, scope := binary.BigEndian.Uint16(d[4:]), d[12]&3; code != 1 || scope != 2 {
		t.Fatalf("first parameter %#x scope %d, want available resources of a shared pool", code, scope)
	}
	if used := binary.BigEndian.Uint32(d[16+4:]); binary.BigEndian.Uint16(d[16:]) != 2 || used != 1 {
		t.Fatalf("used resources %d threshold sets, want 1 (1 MiB written)", used)
	}
	r, d = f.run(nexusA, []byte{opLogSense, 0, 0x40, 0, 0, 0, 0, 0, 255, 0}, nil, 255)
	f.expectGood(r, "LOG SENSE supported pages")
	if len(d) != 6 || d[5] != logLBP {
		t.Fatalf("supported log pages % x", d)
	}
	f.expectSense(first(f.run(nexusA, []byte{opLogSense, 0, 0x40 | 0x2F, 0, 0, 0, 0, 0, 255, 0}, nil, 255)),
		SenseIllegalRequest, ascInvalidFieldCDB, "unsupported log page")

	f.lu.ThresholdReached()
	f.expectSense(first(f.run(nexusA, tur, nil, 0)), SenseUnitAttention, ascSoftThresholdReached, "after the threshold")
	f.expectGood(first(f.run(nexusA, tur, nil, 0)), "reported once")
}
