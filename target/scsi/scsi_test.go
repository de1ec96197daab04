//go:build linux

// These tests run on the real volume pool (fdatasync, hole punching, SEEK_DATA), which is
// Linux only.

package scsi

import (
	"bytes"
	"encoding/binary"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"nstarget/backend"
)

const testBlocks = 2048 // 1 MiB at 512-byte blocks

// countingVolume is a real backend volume that counts Sync calls, so tests can see when the
// SCSI layer asks for durability.
type countingVolume struct {
	backend.Volume
	syncs atomic.Int64
}

func (c *countingVolume) Sync() error {
	c.syncs.Add(1)
	return c.Volume.Sync()
}

type fixture struct {
	t    *testing.T
	dev  *Device
	lu   *LU
	vol  *countingVolume
	path string // the volume's file, for checks that must not trust the volume's own word
}

func newFixture(t testing.TB, cfg LUConfig) *fixture {
	t.Helper()
	dir := t.TempDir()
	pool, err := backend.OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	bs := cfg.BlockSize
	if bs == 0 {
		bs = 512
	}
	v, err := pool.Open("lu0", int64(testBlocks)*int64(bs))
	if err != nil {
		t.Fatal(err)
	}
	cv := &countingVolume{Volume: v}
	lu, err := NewLU(cv, cfg)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{dev: NewDevice(map[uint64]*LU{0: lu}), lu: lu, vol: cv, path: filepath.Join(dir, "lu0")}
	if tt, ok := t.(*testing.T); ok {
		f.t = tt
	}
	return f
}

var (
	nexusA = &Nexus{ID: 1, InitiatorName: "iqn.2026-01.test:a", ISID: [6]byte{0x80, 0, 0, 0, 0, 1}, TargetName: "iqn.2026-01.test:t", RelTargetPortID: 1, TPGT: 1}
	nexusB = &Nexus{ID: 2, InitiatorName: "iqn.2026-01.test:b", ISID: [6]byte{0x80, 0, 0, 0, 0, 2}, TargetName: "iqn.2026-01.test:t", RelTargetPortID: 1, TPGT: 1}
	nexusC = &Nexus{ID: 3, InitiatorName: "iqn.2026-01.test:c", ISID: [6]byte{0x80, 0, 0, 0, 0, 3}, TargetName: "iqn.2026-01.test:t", RelTargetPortID: 1, TPGT: 1}
)

// run executes cdb; for reads pass expLen and nil out, for writes pass out (expLen = len(out)).
func (f *fixture) run(n *Nexus, cdb []byte, out []byte, expLen int) (Result, []byte) {
	cmd := &Command{Nexus: n, LUN: 0, CDB: cdb, ExpectedLen: uint32(expLen), DataOut: out}
	if out == nil && expLen > 0 {
		cmd.DataIn = make([]byte, expLen)
	}
	r := f.dev.Execute(cmd)
	if r.DataInLen > len(cmd.DataIn) {
		panic("DataInLen beyond the buffer")
	}
	return r, cmd.DataIn[:r.DataInLen]
}

func senseOf(r Result) (key byte, code asc) {
	if len(r.Sense) < 14 {
		return 0, 0
	}
	return r.Sense[2] & 0x0F, asc(r.Sense[12])<<8 | asc(r.Sense[13])
}

func (f *fixture) expectGood(r Result, what string) {
	f.t.Helper()
	if r.Status != StatusGood {
		k, c := senseOf(r)
		f.t.Fatalf("%s: status %#x sense %x/%04x, want GOOD", what, r.Status, k, c)
	}
}

func (f *fixture) expectSense(r Result, key byte, code asc, what string) {
	f.t.Helper()
	k, c := senseOf(r)
	if r.Status != StatusCheckCondition || k != key || c != code {
		f.t.Fatalf("%s: status %#x sense %x/%04x, want CHECK CONDITION %x/%04x", what, r.Status, k, c, key, code)
	}
}

func read10(lba uint32, n uint16) []byte {
	c := make([]byte, 10)
	c[0] = opRead10
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], n)
	return c
}

func write10(lba uint32, n uint16, flags byte) []byte {
	c := make([]byte, 10)
	c[0] = opWrite10
	c[1] = flags
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], n)
	return c
}

func rw16(op byte, lba uint64, n uint32, flags byte) []byte {
	c := make([]byte, 16)
	c[0] = op
	c[1] = flags
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], n)
	return c
}

func rw12(op byte, lba uint32, n uint32) []byte {
	c := make([]byte, 12)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint32(c[6:], n)
	return c
}

func rw6(op byte, lba uint32, n byte) []byte {
	return []byte{op, byte(lba >> 16 & 0x1F), byte(lba >> 8), byte(lba), n, 0}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestReadAfterWriteEveryCDBSize(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.t = t
	cases := []struct {
		name   string
		write  []byte
		read   []byte
		lba    int
		blocks int
	}{
		{"6", rw6(opWrite6, 3, 2), rw6(opRead6, 3, 2), 3, 2},
		{"10", write10(100, 4, 0), read10(100, 4), 100, 4},
		{"12", rw12(opWrite12, 200, 3), rw12(opRead12, 200, 3), 200, 3},
		{"16", rw16(opWrite16, testBlocks-5, 5, 0), rw16(opRead16, testBlocks-5, 5, 0), testBlocks - 5, 5},
		{"write-verify-10", []byte{opWriteVerify10, 0x02, 0, 0, 1, 0, 0, 0, 2, 0}, read10(256, 2), 256, 2},
		{"write-verify-16", rw16(opWriteVerify16, 300, 1, 0x02), rw16(opRead16, 300, 1, 0), 300, 1},
		{"write-atomic-16", func() []byte {
			c := rw16(opWriteAtomic16, 400, 0, 0)
			binary.BigEndian.PutUint16(c[12:], 3)
			return c
		}(), rw16(opRead16, 400, 3, 0), 400, 3},
	}
	for i, c := range cases {
		data := pattern(c.blocks*512, byte(i+1))
		r, _ := f.run(nexusA, c.write, data, len(data))
		f.expectGood(r, c.name+" write")
		if r.Wanted != uint32(len(data)) {
			t.Fatalf("%s: write Wanted %d, want %d", c.name, r.Wanted, len(data))
		}
		r, got := f.run(nexusA, c.read, nil, len(data))
		f.expectGood(r, c.name+" read")
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: read back differs", c.name)
		}
		// The medium holds it, not just some cache of ours.
		raw := make([]byte, len(data))
		f.vol.ReadAt(raw, int64(c.lba)*512)
		if !bytes.Equal(raw, data) {
			t.Fatalf("%s: volume holds other data", c.name)
		}
	}
	// READ(6) with length 0 means 256 blocks.
	r, got := f.run(nexusA, rw6(opRead6, 0, 0), nil, 256*512)
	f.expectGood(r, "read6 len 0")
	if len(got) != 256*512 || r.Wanted != 256*512 {
		t.Fatalf("read6 len 0 moved %d bytes, Wanted %d; want 256 blocks", len(got), r.Wanted)
	}
}

func TestFUAAndWriteCacheDecideDurability(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.t = t
	data := pattern(512, 9)
	r, _ := f.run(nexusA, write10(1, 1, 0), data, 512)
	f.expectGood(r, "write")
	if n := f.vol.syncs.Load(); n != 0 {
		t.Fatalf("cached write synced %d times", n)
	}
	r, _ = f.run(nexusA, write10(1, 1, 0x08), data, 512)
	f.expectGood(r, "FUA write")
	if n := f.vol.syncs.Load(); n != 1 {
		t.Fatalf("FUA write synced %d times, want 1", n)
	}
	r, _ = f.run(nexusA, []byte{opSyncCache10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil, 0)
	f.expectGood(r, "SYNCHRONIZE CACHE")
	if n := f.vol.syncs.Load(); n != 2 {
		t.Fatalf("SYNCHRONIZE CACHE: %d syncs, want 2", n)
	}

	wt := newFixture(t, LUConfig{WriteCache: false})
	wt.t = t
	r, _ = wt.run(nexusA, write10(1, 1, 0), data, 512)
	wt.expectGood(r, "write-through write")
	if n := wt.vol.syncs.Load(); n != 1 {
		t.Fatalf("write without write cache synced %d times, want 1", n)
	}
	// Deallocation is a change of the medium: write-through makes it durable too.
	before := wt.vol.syncs.Load()
	param := make([]byte, 24)
	binary.BigEndian.PutUint16(param[0:], 22)
	binary.BigEndian.PutUint16(param[2:], 16)
	binary.BigEndian.PutUint64(param[8:], 1)
	binary.BigEndian.PutUint32(param[16:], 1)
	wt.expectGood(first(wt.run(nexusA, []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, param, 24)), "write-through UNMAP")
	if n := wt.vol.syncs.Load() - before; n != 1 {
		t.Fatalf("UNMAP without write cache synced %d times, want 1", n)
	}

	// MODE SENSE caching page tells the truth about both.
	for _, c := range []struct {
		f   *fixture
		wce bool
	}{{f, true}, {wt, false}} {
		r, d := c.f.run(nexusA, []byte{opModeSense6, 0x08, pageCaching, 0, 255, 0}, nil, 255)
		c.f.expectGood(r, "MODE SENSE caching")
		if got := d[4+2]&0x04 != 0; got != c.wce {
			t.Fatalf("caching page WCE=%v, want %v", got, c.wce)
		}
	}
}

// Turning the write cache off with MODE SELECT flushes what was acknowledged while it was on:
// from then on the initiator no longer sends SYNCHRONIZE CACHE for those writes.
func TestModeSelectWriteCacheOffFlushesCachedWrites(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.t = t
	f.expectGood(first(f.run(nexusA, write10(3, 1, 0), pattern(512, 4), 512)), "cached write")
	if n := f.vol.syncs.Load(); n != 0 {
		t.Fatalf("cached write synced %d times", n)
	}
	sel := make([]byte, 4+20)
	sel[4], sel[5] = pageCaching, 0x12 // WCE=0
	f.expectGood(first(f.run(nexusA, []byte{opModeSelect6, 0x10, 0, 0, byte(len(sel)), 0}, sel, len(sel))), "MODE SELECT WCE=0")
	if n := f.vol.syncs.Load(); n != 1 {
		t.Fatalf("turning the write cache off synced %d times, want 1", n)
	}
	f.expectGood(first(f.run(nexusA, write10(3, 1, 0), pattern(512, 5), 512)), "write-through write")
	if n := f.vol.syncs.Load(); n != 2 {
		t.Fatalf("write after WCE=0 synced %d times in all, want 2", n)
	}
}

func TestResidualWantedFollowsTheCDB(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	data := pattern(2*512, 3)
	f.expectGood(first(f.run(nexusA, write10(10, 2, 0), data, len(data))), "prep")
	for _, c := range []struct {
		exp        int
		wantFilled int
	}{{0, 0}, {200, 200}, {512, 512}, {1024, 1024}, {10000, 1024}} {
		r, got := f.run(nexusA, read10(10, 2), nil, c.exp)
		f.expectGood(r, "read")
		if r.Wanted != 1024 || r.DataInLen != c.wantFilled {
			t.Fatalf("ExpectedLen %d: Wanted %d DataInLen %d, want 1024/%d", c.exp, r.Wanted, r.DataInLen, c.wantFilled)
		}
		if !bytes.Equal(got, data[:c.wantFilled]) {
			t.Fatalf("ExpectedLen %d: wrong data", c.exp)
		}
	}
	// A short Data-Out writes only what arrived; the rest of the range keeps its data.
	short := bytes.Repeat([]byte{'b'}, 200)
	r, _ := f.run(nexusA, write10(10, 2, 0), short, 200)
	f.expectGood(r, "short write")
	if r.Wanted != 1024 {
		t.Fatalf("short write Wanted %d", r.Wanted)
	}
	_, got := f.run(nexusA, read10(10, 2), nil, 1024)
	if !bytes.Equal(got[:200], short) || !bytes.Equal(got[200:], data[200:]) {
		t.Fatal("short write touched bytes it did not carry")
	}
	// More Data-Out than the CDB asks for never spills into the next block.
	long := bytes.Repeat([]byte{'c'}, 3*512)
	f.expectGood(first(f.run(nexusA, write10(10, 1, 0), long, len(long))), "long write")
	_, got = f.run(nexusA, read10(11, 1), nil, 512)
	if !bytes.Equal(got, data[512:1024]) {
		t.Fatal("over-long Data-Out written past the addressed block")
	}
	// Allocation-length commands report what they return.
	r, _ = f.run(nexusA, []byte{opModeSense6, 0, pageAll, 0, 255, 0}, nil, 255)
	if r.Wanted != uint32(r.DataInLen) || r.Wanted >= 255 {
		t.Fatalf("MODE SENSE Wanted %d DataInLen %d: short answer must show as underflow", r.Wanted, r.DataInLen)
	}
	r, _ = f.run(nexusA, []byte{opModeSense6, 0, pageAll, 0, 4, 0}, nil, 4)
	if r.Wanted != 4 || r.DataInLen != 4 {
		t.Fatalf("MODE SENSE alloc 4: Wanted %d DataInLen %d", r.Wanted, r.DataInLen)
	}
}

func first(r Result, _ []byte) Result { return r }

func TestRangeAndLimitErrors(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.expectSense(first(f.run(nexusA, read10(testBlocks, 1), nil, 512)), SenseIllegalRequest, ascLBAOutOfRange, "read at end")
	f.expectSense(first(f.run(nexusA, read10(testBlocks-1, 2), nil, 1024)), SenseIllegalRequest, ascLBAOutOfRange, "read across end")
	f.expectSense(first(f.run(nexusA, rw16(opRead16, 1<<63, 1, 0), nil, 512)), SenseIllegalRequest, ascLBAOutOfRange, "read at 2^63")
	f.expectSense(first(f.run(nexusA, rw16(opRead16, ^uint64(0), 1, 0), nil, 512)), SenseIllegalRequest, ascLBAOutOfRange, "read at 2^64-1 (wraps)")
	f.expectSense(first(f.run(nexusA, rw16(opWrite16, testBlocks-1, 2, 0), make([]byte, 1024), 1024)), SenseIllegalRequest, ascLBAOutOfRange, "write across end")
	f.expectGood(first(f.run(nexusA, read10(0, 0), nil, 0)), "read of zero blocks")

	// Beyond the transfer limit but inside the medium is INVALID FIELD IN CDB.
	over := uint32(maxTransferBytes/512 + 1)
	pool, _ := backend.OpenPool(t.TempDir())
	defer pool.Close()
	v, err := pool.Open("big", int64(over+10)*512)
	if err != nil {
		t.Fatal(err)
	}
	lu, _ := NewLU(v, LUConfig{})
	d := NewDevice(map[uint64]*LU{0: lu})
	r := d.Execute(&Command{Nexus: nexusA, CDB: rw16(opRead16, 0, lu.maxXferBlocks+1, 0)})
	f.expectSense(r, SenseIllegalRequest, ascInvalidFieldCDB, "read beyond MAXIMUM TRANSFER LENGTH")
	r = d.Execute(&Command{Nexus: nexusA, CDB: rw16(opRead16, 0, 1, 0x20)})
	f.expectSense(r, SenseIllegalRequest, ascInvalidFieldCDB, "RDPROTECT without protection")
}

func TestReadOnlyAndSoftwareWriteProtect(t *testing.T) {
	f := newFixture(t, LUConfig{ReadOnly: true})
	f.t = t
	data := make([]byte, 512)
	for _, cdb := range [][]byte{
		write10(0, 1, 0),
		rw16(opWriteSame16, 0, 1, 0x08),
		{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0},
	} {
		r, _ := f.run(nexusA, cdb, data, len(data))
		f.expectSense(r, SenseDataProtect, ascWriteProtected, "write to read-only LU")
	}
	f.expectGood(first(f.run(nexusA, read10(0, 1), nil, 512)), "read of read-only LU")
	r, d := f.run(nexusA, []byte{opModeSense6, 0x08, pageAll, 0, 255, 0}, nil, 255)
	f.expectGood(r, "mode sense")
	if d[2]&0x80 == 0 {
		t.Fatal("read-only LU does not report WP in MODE SENSE")
	}

	// SWP via MODE SELECT on a writable LU.
	w := newFixture(t, LUConfig{})
	w.t = t
	page := make([]byte, 4+12)
	page[4] = pageControl
	page[5] = 0x0A
	page[4+4] = 0x08
	w.expectGood(first(w.run(nexusB, []byte{opTestUnitReady, 0, 0, 0, 0, 0}, nil, 0)), "B talks to the LU")
	w.expectGood(first(w.run(nexusA, []byte{opModeSelect6, 0x10, 0, 0, byte(len(page)), 0}, page, len(page))), "MODE SELECT SWP=1")
	w.expectSense(first(w.run(nexusA, write10(0, 1, 0), data, 512)), SenseDataProtect, ascWriteProtected, "write with SWP")
	// The other nexus learns about the change once.
	w.expectSense(first(w.run(nexusB, read10(0, 1), nil, 512)), SenseUnitAttention, ascModeParamsChanged, "UA after MODE SELECT")
	w.expectGood(first(w.run(nexusB, read10(0, 1), nil, 512)), "UA consumed")
}

func TestUnmapThenGetLBAStatus(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	data := pattern(64*512, 5)
	f.expectGood(first(f.run(nexusA, write10(0, 64, 0), data, len(data))), "write 64 blocks")
	status := func(lba uint64) (uint64, uint32, byte) {
		c := make([]byte, 16)
		c[0] = opServiceActionIn
		c[1] = saGetLBAStatus
		binary.BigEndian.PutUint64(c[2:], lba)
		binary.BigEndian.PutUint32(c[10:], 24)
		r, d := f.run(nexusA, c, nil, 24)
		f.expectGood(r, "GET LBA STATUS")
		return binary.BigEndian.Uint64(d[8:]), binary.BigEndian.Uint32(d[16:]), d[20]
	}
	if lba, n, st := status(0); lba != 0 || st != 0 || n < 64 {
		t.Fatalf("after write: lba %d n %d status %d, want mapped >= 64", lba, n, st)
	}
	param := make([]byte, 24)
	binary.BigEndian.PutUint16(param[0:], 22)
	binary.BigEndian.PutUint16(param[2:], 16)
	binary.BigEndian.PutUint64(param[8:], 16)
	binary.BigEndian.PutUint32(param[16:], 32)
	f.expectGood(first(f.run(nexusA, []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, param, 24)), "UNMAP 16..47")
	if lba, n, st := status(16); lba != 16 || st != 1 || n != 32 {
		t.Fatalf("after unmap: lba %d n %d status %d, want 16/32/deallocated", lba, n, st)
	}
	if lba, n, st := status(48); lba != 48 || st != 0 || n < 16 {
		t.Fatalf("after unmapped range: lba %d n %d status %d, want mapped", lba, n, st)
	}
	_, got := f.run(nexusA, read10(0, 64), nil, 64*512)
	for i := range got {
		want := data[i]
		if i >= 16*512 && i < 48*512 {
			want = 0
		}
		if got[i] != want {
			t.Fatalf("byte %d after unmap = %#x, want %#x", i, got[i], want)
		}
	}
	// A descriptor past the end fails the whole command and unmaps nothing.
	binary.BigEndian.PutUint64(param[8:], testBlocks-1)
	binary.BigEndian.PutUint32(param[16:], 2)
	f.expectSense(first(f.run(nexusA, []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, param, 24)), SenseIllegalRequest, ascLBAOutOfRange, "UNMAP beyond end")
	c := make([]byte, 16)
	c[0], c[1] = opServiceActionIn, saGetLBAStatus
	binary.BigEndian.PutUint64(c[2:], testBlocks)
	binary.BigEndian.PutUint32(c[10:], 24)
	f.expectSense(first(f.run(nexusA, c, nil, 24)), SenseIllegalRequest, ascLBAOutOfRange, "GET LBA STATUS beyond end")
}

func TestWriteSameWritesAndUnmaps(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	block := pattern(512, 77)
	f.expectGood(first(f.run(nexusA, rw16(opWriteSame16, 10, 600, 0), block, 512)), "WRITE SAME 16")
	_, got := f.run(nexusA, read10(10, 600), nil, 600*512)
	for i := 0; i < 600; i++ {
		if !bytes.Equal(got[i*512:(i+1)*512], block) {
			t.Fatalf("block %d not written by WRITE SAME", 10+i)
		}
	}
	_, before := f.run(nexusA, read10(9, 1), nil, 512)
	if !bytes.Equal(before, make([]byte, 512)) {
		t.Fatal("WRITE SAME wrote the block before its range")
	}
	ws10 := []byte{opWriteSame10, 0x08, 0, 0, 0, 10, 0, 0x02, 0x58, 0}
	f.expectGood(first(f.run(nexusA, ws10, make([]byte, 512), 512)), "WRITE SAME 10 UNMAP")
	_, got = f.run(nexusA, read10(10, 600), nil, 600*512)
	if !allZero(got) {
		t.Fatal("WRITE SAME with UNMAP did not read back zeros")
	}
	// UNMAP with a non-zero block writes the block: only zeros may be deallocated.
	ws16 := rw16(opWriteSame16, 20, 16, 0x08)
	f.expectGood(first(f.run(nexusA, ws16, block, 512)), "WRITE SAME 16 UNMAP with a pattern")
	_, got = f.run(nexusA, read10(19, 18), nil, 18*512)
	if !allZero(got[:512]) || !allZero(got[17*512:]) {
		t.Fatal("WRITE SAME UNMAP with a pattern wrote outside its range")
	}
	for i := 1; i <= 16; i++ {
		if !bytes.Equal(got[i*512:(i+1)*512], block) {
			t.Fatalf("WRITE SAME UNMAP with a non-zero block: block %d does not hold the pattern", 19+i)
		}
	}
	f.expectGood(first(f.run(nexusA, []byte{opWriteSame10, 0x08, 0, 0, 0, 30, 0, 0, 4, 0}, block, 512)), "WRITE SAME 10 UNMAP with a pattern")
	if _, got = f.run(nexusA, read10(30, 4), nil, 4*512); !bytes.Equal(got[3*512:], block) {
		t.Fatal("WRITE SAME 10 UNMAP with a non-zero block did not write it")
	}
	ndob := rw16(opWriteSame16, 0, 8, 0x09)
	f.expectGood(first(f.run(nexusA, ndob, nil, 0)), "WRITE SAME 16 NDOB UNMAP")
	f.expectGood(first(f.run(nexusA, rw16(opWriteSame16, testBlocks-3, 0, 0), block, 512)), "WRITE SAME 0 blocks: to the end")
	_, got = f.run(nexusA, read10(testBlocks-4, 4), nil, 4*512)
	if !allZero(got[:512]) || !bytes.Equal(got[512:1024], block) || !bytes.Equal(got[1536:], block) {
		t.Fatal("WRITE SAME with 0 blocks did not write exactly through the last LBA")
	}
	f.expectSense(first(f.run(nexusA, rw16(opWriteSame16, testBlocks, 0, 0), block, 512)), SenseIllegalRequest, ascLBAOutOfRange, "WRITE SAME 0 blocks past the end")
	f.expectSense(first(f.run(nexusA, rw16(opWriteSame16, 0, 1, 0), make([]byte, 1024), 1024)), SenseIllegalRequest, ascInvalidFieldCDB, "WRITE SAME with two blocks of data")
}

func caw(lba uint64, blocks byte) []byte {
	c := make([]byte, 16)
	c[0] = opCompareAndWrite
	binary.BigEndian.PutUint64(c[2:], lba)
	c[13] = blocks
	return c
}

func TestCompareAndWriteMiscompareReportsOffset(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	old := bytes.Repeat([]byte{'A'}, 2*512)
	f.expectGood(first(f.run(nexusA, write10(5, 2, 0), old, len(old))), "prep")
	buf := append(bytes.Repeat([]byte{'A'}, 2*512), bytes.Repeat([]byte{'B'}, 2*512)...)
	buf[700] = 'C'
	r, _ := f.run(nexusA, caw(5, 2), buf, len(buf))
	f.expectSense(r, SenseMiscompare, ascMiscompareVerify, "CAW miscompare")
	if r.Sense[0]&0x80 == 0 || binary.BigEndian.Uint32(r.Sense[3:7]) != 700 {
		t.Fatalf("miscompare INFORMATION = %d (valid %v), want 700", binary.BigEndian.Uint32(r.Sense[3:7]), r.Sense[0]&0x80 != 0)
	}
	_, got := f.run(nexusA, read10(5, 2), nil, 1024)
	if !bytes.Equal(got, old) {
		t.Fatal("miscompared CAW wrote data")
	}
	buf[700] = 'A'
	f.expectGood(first(f.run(nexusA, caw(5, 2), buf, len(buf))), "CAW match")
	_, got = f.run(nexusA, read10(5, 2), nil, 1024)
	if !bytes.Equal(got, buf[1024:]) {
		t.Fatal("CAW did not write")
	}
	f.expectSense(first(f.run(nexusA, caw(5, 2), buf[:1024], 1024)), SenseIllegalRequest, ascInvalidFieldCDB, "CAW with half the data")
}

// Many goroutines increment one counter block with COMPARE AND WRITE; if the compare and
// the write were not atomic, increments would be lost.
func TestCompareAndWriteIsAtomicUnderConcurrency(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	const workers, each = 8, 50
	var wg sync.WaitGroup
	var failed atomic.Bool
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := &Nexus{ID: uint64(100 + w), InitiatorName: "iqn.x:w"}
			for done := 0; done < each; {
				cmd := &Command{Nexus: n, CDB: read10(7, 1), ExpectedLen: 512, DataIn: make([]byte, 512)}
				if r := f.dev.Execute(cmd); r.Status != StatusGood {
					failed.Store(true)
					return
				}
				buf := make([]byte, 1024)
				copy(buf, cmd.DataIn)
				v := binary.BigEndian.Uint64(cmd.DataIn)
				binary.BigEndian.PutUint64(buf[512:], v+1)
				r := f.dev.Execute(&Command{Nexus: n, CDB: caw(7, 1), ExpectedLen: 1024, DataOut: buf})
				switch {
				case r.Status == StatusGood:
					done++
				case r.Status == StatusCheckCondition && r.Sense[2]&0x0F == SenseMiscompare:
				default:
					failed.Store(true)
					return
				}
			}
		}()
		// Plain writers elsewhere on the LU run at the same time.
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := &Nexus{ID: uint64(200 + w), InitiatorName: "iqn.x:p"}
			for i := 0; i < each; i++ {
				f.dev.Execute(&Command{Nexus: n, CDB: write10(uint32(20+w), 1, 0), ExpectedLen: 512, DataOut: make([]byte, 512)})
			}
		}()
	}
	wg.Wait()
	if failed.Load() {
		t.Fatal("unexpected status during concurrent CAW")
	}
	_, got := f.run(nexusA, read10(7, 1), nil, 512)
	if v := binary.BigEndian.Uint64(got); v != workers*each {
		t.Fatalf("counter = %d, want %d: COMPARE AND WRITE lost updates", v, workers*each)
	}
}

func TestOrWriteOrsIntoTheMedium(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.expectGood(first(f.run(nexusA, write10(3, 1, 0), bytes.Repeat([]byte{0x0F}, 512), 512)), "prep")
	f.expectGood(first(f.run(nexusA, rw16(opOrWrite16, 3, 1, 0), bytes.Repeat([]byte{0xA0}, 512), 512)), "ORWRITE")
	_, got := f.run(nexusA, read10(3, 1), nil, 512)
	if !bytes.Equal(got, bytes.Repeat([]byte{0xAF}, 512)) {
		t.Fatalf("ORWRITE result %x", got[:4])
	}
}

func TestVerifyComparesWithBytchk(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	data := pattern(3*512, 11)
	f.expectGood(first(f.run(nexusA, write10(40, 3, 0), data, len(data))), "prep")
	verify := []byte{opVerify10, 0x02, 0, 0, 0, 40, 0, 0, 3, 0}
	f.expectGood(first(f.run(nexusA, verify, data, len(data))), "VERIFY match")
	bad := bytes.Clone(data)
	bad[1000] ^= 0xFF
	r, _ := f.run(nexusA, verify, bad, len(bad))
	f.expectSense(r, SenseMiscompare, ascMiscompareVerify, "VERIFY mismatch")
	if binary.BigEndian.Uint32(r.Sense[3:7]) != 1000 {
		t.Fatalf("VERIFY miscompare offset %d, want 1000", binary.BigEndian.Uint32(r.Sense[3:7]))
	}
	f.expectGood(first(f.run(nexusA, []byte{opVerify10, 0, 0, 0, 0, 40, 0, 0, 3, 0}, nil, 0)), "VERIFY BYTCHK=0")
}

func prOut(sa, typ byte, key, sark uint64) ([]byte, []byte) {
	c := []byte{opPROut, sa, typ, 0, 0, 0, 0, 0, 24, 0}
	p := make([]byte, 24)
	binary.BigEndian.PutUint64(p[0:], key)
	binary.BigEndian.PutUint64(p[8:], sark)
	return c, p
}

func (f *fixture) prOut(n *Nexus, sa, typ byte, key, sark uint64) Result {
	c, p := prOut(sa, typ, key, sark)
	r, _ := f.run(n, c, p, 24)
	return r
}

// clearUA drains unit attentions of n.
func (f *fixture) clearUA(n *Nexus) {
	for i := 0; i < 10; i++ {
		r, _ := f.run(n, []byte{opTestUnitReady, 0, 0, 0, 0, 0}, nil, 0)
		if r.Status == StatusGood || r.Status == StatusReservationConflict {
			return
		}
	}
}

func TestPersistentReservationConflictMatrix(t *testing.T) {
	// A holds the reservation, B is registered, C is not.
	type want struct{ bRead, bWrite, cRead, cWrite bool } // true: allowed
	cases := []struct {
		name string
		typ  byte
		want want
	}{
		{"WE", prWE, want{true, false, true, false}},
		{"EA", prEA, want{false, false, false, false}},
		{"WE-RO", prWERO, want{true, true, true, false}},
		{"EA-RO", prEARO, want{true, true, false, false}},
		{"WE-AR", prWEAR, want{true, true, true, false}},
		{"EA-AR", prEAAR, want{true, true, false, false}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, LUConfig{})
			f.t = t
			f.expectGood(f.prOut(nexusA, saRegister, 0, 0, 0xA), "register A")
			f.expectGood(f.prOut(nexusB, saRegisterIgnore, 0, 0, 0xB), "register B")
			f.expectGood(f.prOut(nexusA, saReserve, c.typ, 0xA, 0), "reserve")
			check := func(n *Nexus, write, allowed bool, who string) {
				var r Result
				if write {
					r, _ = f.run(n, write10(0, 1, 0), make([]byte, 512), 512)
				} else {
					r, _ = f.run(n, read10(0, 1), nil, 512)
				}
				got := r.Status == StatusGood
				if r.Status != StatusGood && r.Status != StatusReservationConflict {
					t.Fatalf("%s: status %#x", who, r.Status)
				}
				if got != allowed {
					t.Fatalf("%s write=%v: allowed=%v, want %v", who, write, got, allowed)
				}
			}
			check(nexusA, false, true, "holder read")
			check(nexusA, true, true, "holder write")
			check(nexusB, false, c.want.bRead, "registrant read")
			check(nexusB, true, c.want.bWrite, "registrant write")
			check(nexusC, false, c.want.cRead, "unregistered read")
			check(nexusC, true, c.want.cWrite, "unregistered write")
			// Always allowed commands.
			f.expectGood(first(f.run(nexusC, []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36)), "INQUIRY under reservation")
			f.expectGood(first(f.run(nexusC, []byte{opTestUnitReady, 0, 0, 0, 0, 0}, nil, 0)), "TUR under reservation")
			// Non-holder cannot reserve; release by a non-holder is a no-op.
			if allRegistrants(c.typ) {
				f.expectGood(f.prOut(nexusB, saReserve, c.typ, 0xB, 0), "AR registrant reserve")
			} else {
				if r := f.prOut(nexusB, saReserve, c.typ, 0xB, 0); r.Status != StatusReservationConflict {
					t.Fatalf("second reserve: status %#x, want conflict", r.Status)
				}
			}
			// Wrong type on release by the holder.
			other := byte(prWE)
			if c.typ == prWE {
				other = prEA
			}
			f.expectSense(f.prOut(nexusA, saRelease, other, 0xA, 0), SenseIllegalRequest, ascInvalidReleasePR, "release with wrong type")
			f.expectGood(f.prOut(nexusA, saRelease, c.typ, 0xA, 0), "release")
			if c.typ != prWE && c.typ != prEA {
				f.expectSense(first(f.run(nexusB, read10(0, 1), nil, 512)), SenseUnitAttention, ascReservationsReleased, "RESERVATIONS RELEASED to registrant")
			}
			check(nexusC, true, true, "write after release")
		})
	}
}

func TestPersistentReservationKeysPreemptAndClear(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	if r := f.prOut(nexusA, saRegister, 0, 0x99, 0xA); r.Status != StatusReservationConflict {
		t.Fatal("REGISTER of an unregistered nexus with a non-zero key must conflict")
	}
	f.expectGood(f.prOut(nexusA, saRegister, 0, 0, 0xA), "register A")
	f.expectGood(f.prOut(nexusB, saRegister, 0, 0, 0xB), "register B")
	readKeys := func() (uint32, []uint64) {
		r, d := f.run(nexusA, []byte{opPRIn, 0, 0, 0, 0, 0, 0, 0x40, 0, 0}, nil, 0x4000)
		f.expectGood(r, "READ KEYS")
		var keys []uint64
		n := binary.BigEndian.Uint32(d[4:])
		for i := uint32(0); i < n/8; i++ {
			keys = append(keys, binary.BigEndian.Uint64(d[8+8*i:]))
		}
		return binary.BigEndian.Uint32(d[0:]), keys
	}
	gen, keys := readKeys()
	if len(keys) != 2 || keys[0] != 0xA || keys[1] != 0xB {
		t.Fatalf("keys %x", keys)
	}
	// Truncated READ KEYS keeps ADDITIONAL LENGTH.
	r, d := f.run(nexusA, []byte{opPRIn, 0, 0, 0, 0, 0, 0, 0, 8, 0}, nil, 8)
	f.expectGood(r, "READ KEYS alloc 8")
	if len(d) != 8 || binary.BigEndian.Uint32(d[4:]) != 16 {
		t.Fatalf("truncated READ KEYS: %x", d)
	}
	f.expectGood(f.prOut(nexusA, saReserve, prEA, 0xA, 0), "A reserves EA")
	f.expectGood(f.prOut(nexusB, saPreempt, prWE, 0xB, 0xA), "B preempts A")
	f.expectSense(first(f.run(nexusA, read10(0, 1), nil, 512)), SenseUnitAttention, ascRegistrationsPreempted, "A told it was preempted")
	gen2, keys := readKeys()
	if len(keys) != 1 || keys[0] != 0xB || gen2 != gen+1 {
		t.Fatalf("after preempt: gen %d->%d keys %x", gen, gen2, keys)
	}
	r, d = f.run(nexusA, []byte{opPRIn, 1, 0, 0, 0, 0, 0, 0, 24, 0}, nil, 24)
	f.expectGood(r, "READ RESERVATION")
	if binary.BigEndian.Uint64(d[8:]) != 0xB || d[21]&0x0F != prWE {
		t.Fatalf("reservation after preempt: %x", d)
	}
	// A, no longer registered, is refused PR OUT other than register.
	if r := f.prOut(nexusA, saRelease, prWE, 0xA, 0); r.Status != StatusReservationConflict {
		t.Fatal("unregistered RELEASE must conflict")
	}
	f.expectGood(f.prOut(nexusA, saRegisterIgnore, 0, 0, 0xC), "A registers again")
	f.expectGood(f.prOut(nexusB, saClear, 0, 0xB, 0), "CLEAR")
	f.expectSense(first(f.run(nexusA, read10(0, 1), nil, 512)), SenseUnitAttention, ascReservationsPreempted, "CLEAR reported")
	if _, keys := readKeys(); len(keys) != 0 {
		t.Fatalf("keys after CLEAR: %x", keys)
	}
	// Registration survives session reinstatement (same initiator port, new nexus ID).
	f.expectGood(f.prOut(nexusA, saRegister, 0, 0, 0xD), "register A")
	reinstated := *nexusA
	reinstated.ID = 77
	f.dev.NexusLoss(nexusA)
	f.expectGood(f.prOut(&reinstated, saRegister, 0, 0xD, 0), "unregister from reinstated session")
	// REPORT CAPABILITIES and READ FULL STATUS parse.
	r, d = f.run(nexusA, []byte{opPRIn, 2, 0, 0, 0, 0, 0, 0, 8, 0}, nil, 8)
	f.expectGood(r, "REPORT CAPABILITIES")
	if binary.BigEndian.Uint16(d) != 8 || binary.BigEndian.Uint16(d[4:])&0xEA01 != 0xEA01 {
		t.Fatalf("capabilities %x", d)
	}
	f.expectGood(f.prOut(nexusB, saRegister, 0, 0, 0xB), "register B")
	r, d = f.run(nexusA, []byte{opPRIn, 3, 0, 0, 0, 0, 0, 1, 0, 0}, nil, 256)
	f.expectGood(r, "READ FULL STATUS")
	if binary.BigEndian.Uint32(d[4:]) == 0 || !bytes.Contains(d, []byte("iqn.2026-01.test:b,i,0x800000000002")) {
		t.Fatalf("full status %q", d)
	}
	// Any registration makes SPC-2 RESERVE conflict.
	if r, _ := f.run(nexusC, []byte{opReserve6, 0, 0, 0, 0, 0}, nil, 0); r.Status != StatusReservationConflict {
		t.Fatal("RESERVE(6) with PR registrations must conflict")
	}
}

// An all-registrants reservation lives only as long as registrants do: a PREEMPT whose key
// removes every registrant (the preempter included) leaves no reservation behind.
func TestPreemptRemovingEveryRegistrantEndsAllRegistrantsReservation(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.expectGood(f.prOut(nexusA, saRegister, 0, 0, 0x5), "register A")
	f.expectGood(f.prOut(nexusB, saRegister, 0, 0, 0x5), "register B with the same key")
	f.expectGood(f.prOut(nexusA, saReserve, prEAAR, 0x5, 0), "A reserves EA all registrants")
	f.expectGood(f.prOut(nexusA, saPreempt, prEAAR, 0x5, 0x5), "A preempts key 5")
	r, d := f.run(nexusC, []byte{opPRIn, 1, 0, 0, 0, 0, 0, 0, 24, 0}, nil, 24)
	f.expectGood(r, "READ RESERVATION")
	if n := binary.BigEndian.Uint32(d[4:]); n != 0 {
		t.Fatalf("reservation left with no registrants: %x", d)
	}
	f.expectGood(first(f.run(nexusC, write10(0, 1, 0), make([]byte, 512), 512)), "unregistered write once nothing is reserved")
}

func TestSPC2ReserveReleasedOnNexusLossAndReset(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	reserve := []byte{opReserve6, 0, 0, 0, 0, 0}
	release := []byte{opRelease6, 0, 0, 0, 0, 0}
	f.expectGood(first(f.run(nexusA, reserve, nil, 0)), "A reserves")
	f.expectGood(first(f.run(nexusA, reserve, nil, 0)), "A reserves again")
	if r, _ := f.run(nexusB, reserve, nil, 0); r.Status != StatusReservationConflict {
		t.Fatal("B reserve must conflict")
	}
	if r, _ := f.run(nexusB, read10(0, 1), nil, 512); r.Status != StatusReservationConflict {
		t.Fatal("B read under SPC-2 reservation must conflict")
	}
	f.expectGood(first(f.run(nexusB, release, nil, 0)), "B release is a no-op")
	f.expectGood(first(f.run(nexusB, []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36)), "B INQUIRY")
	f.dev.NexusLoss(nexusA)
	f.expectGood(first(f.run(nexusB, reserve, nil, 0)), "B reserves after A's nexus loss")
	f.expectGood(first(f.run(nexusC, []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36)), "C talks to the LU")
	if err := f.dev.LUNReset(0, nexusA); err != nil {
		t.Fatal(err)
	}
	if err := f.dev.LUNReset(5, nexusA); err == nil {
		t.Fatal("reset of a missing LUN succeeded")
	}
	f.expectSense(first(f.run(nexusB, read10(0, 1), nil, 512)), SenseUnitAttention, ascPowerOnReset, "UA after LUN reset")
	f.expectSense(first(f.run(nexusC, reserve, nil, 0)), SenseUnitAttention, ascPowerOnReset, "C's first command after reset")
	f.expectGood(first(f.run(nexusC, reserve, nil, 0)), "C reserves: the reset released B's reservation")
}

func TestUnitAttentionOrderingAndRequestSense(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.clearUA(nexusA)
	f.clearUA(nexusB)
	f.dev.TargetReset(nexusA)
	// INQUIRY does not consume the UA; REQUEST SENSE returns it.
	f.expectGood(first(f.run(nexusB, []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36)), "INQUIRY with UA pending")
	r, d := f.run(nexusB, []byte{opRequestSense, 0, 0, 0, 18, 0}, nil, 18)
	f.expectGood(r, "REQUEST SENSE")
	if d[2]&0x0F != SenseUnitAttention || d[12] != 0x29 {
		t.Fatalf("REQUEST SENSE data %x, want the reset UA", d)
	}
	f.expectGood(first(f.run(nexusB, read10(0, 1), nil, 512)), "UA consumed by REQUEST SENSE")
	f.expectGood(first(f.run(nexusA, read10(0, 1), nil, 512)), "the resetting nexus gets no UA")
}

func TestInquiryAndVPDPages(t *testing.T) {
	f := newFixture(t, LUConfig{Vendor: "ACME", Product: "THING", Serial: "SER123"})
	f.t = t
	r, d := f.run(nexusA, []byte{opInquiry, 0, 0, 0, 255, 0}, nil, 255)
	f.expectGood(r, "standard INQUIRY")
	if d[0] != 0 || d[2] != 6 || d[3]&0x0F != 2 || int(d[4])+5 != len(d) || string(d[8:12]) != "ACME" || string(d[16:21]) != "THING" {
		t.Fatalf("standard INQUIRY %q", d)
	}
	r, d = f.run(nexusA, []byte{opInquiry, 1, 0, 0, 255, 0}, nil, 255)
	f.expectGood(r, "VPD 0")
	if !bytes.Equal(d[4:], supportedVPD) {
		t.Fatalf("supported VPD %x", d)
	}
	for _, p := range supportedVPD {
		r, d = f.run(nexusA, []byte{opInquiry, 1, p, 0, 255, 0}, nil, 255)
		f.expectGood(r, "VPD page")
		if d[1] != p || int(binary.BigEndian.Uint16(d[2:]))+4 != len(d) {
			t.Fatalf("VPD %#x: header %x len %d", p, d[:4], len(d))
		}
	}
	_, d = f.run(nexusA, []byte{opInquiry, 1, vpdSerial, 0, 255, 0}, nil, 255)
	if string(d[4:]) != "SER123" {
		t.Fatalf("serial %q", d[4:])
	}
	f.expectSense(first(f.run(nexusA, []byte{opInquiry, 1, 0x99, 0, 255, 0}, nil, 255)), SenseIllegalRequest, ascInvalidFieldCDB, "unknown VPD page")
	f.expectSense(first(f.run(nexusA, []byte{opInquiry, 0, 0x80, 0, 255, 0}, nil, 255)), SenseIllegalRequest, ascInvalidFieldCDB, "page code without EVPD")

	// The NAA designator depends on the volume only.
	g := newFixture(t, LUConfig{})
	g.t = t
	_, d1 := f.run(nexusA, []byte{opInquiry, 1, vpdDeviceID, 0, 255, 0}, nil, 255)
	_, d2 := g.run(nexusB, []byte{opInquiry, 1, vpdDeviceID, 0, 255, 0}, nil, 255)
	if !bytes.Equal(d1[4:16], d2[4:16]) || d1[8]>>4 != 3 {
		t.Fatalf("NAA differs for the same volume name or is not NAA 3: %x vs %x", d1[4:16], d2[4:16])
	}
}

func TestReportLUNsAndMissingLUN(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	d := NewDevice(map[uint64]*LU{0: f.lu, 3: f.lu, 300: f.lu})
	cdb := []byte{opReportLUNs, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}
	cmd := &Command{Nexus: nexusA, LUN: 42, CDB: cdb, ExpectedLen: 256, DataIn: make([]byte, 256)}
	r := d.Execute(cmd)
	if r.Status != StatusGood || binary.BigEndian.Uint32(cmd.DataIn) != 24 {
		t.Fatalf("REPORT LUNS: %#x %x", r.Status, cmd.DataIn[:8])
	}
	want := []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(cmd.DataIn[8:32], want) {
		t.Fatalf("LUN list %x", cmd.DataIn[8:32])
	}
	cmd = &Command{Nexus: nexusA, LUN: 42, CDB: read10(0, 1), ExpectedLen: 512, DataIn: make([]byte, 512)}
	f.expectSense(d.Execute(cmd), SenseIllegalRequest, ascLUNotSupported, "READ to missing LUN")
	cmd = &Command{Nexus: nexusA, LUN: 42, CDB: []byte{opInquiry, 0, 0, 0, 36, 0}, ExpectedLen: 36, DataIn: make([]byte, 36)}
	if r := d.Execute(cmd); r.Status != StatusGood || cmd.DataIn[0] != 0x7F {
		t.Fatalf("INQUIRY to missing LUN: %#x %x", r.Status, cmd.DataIn[0])
	}
}

func TestReportSupportedOperationCodes(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	r, d := f.run(nexusA, []byte{opMaintenanceIn, saReportSupportOps, 0x80, 0, 0, 0, 0, 0, 0x40, 0, 0, 0}, nil, 0x4000)
	f.expectGood(r, "RSOC all with timeouts")
	if int(binary.BigEndian.Uint32(d))+4 != len(d) || (len(d)-4)%20 != 0 || (len(d)-4)/20 != len(cmdDescs) {
		t.Fatalf("RSOC all: length %d for %d commands", len(d), len(cmdDescs))
	}
	r, d = f.run(nexusA, []byte{opMaintenanceIn, saReportSupportOps, 0x01, opRead10, 0, 0, 0, 0, 1, 0, 0, 0}, nil, 256)
	f.expectGood(r, "RSOC one")
	if d[1]&0x07 != 3 || d[4] != opRead10 || d[5]&0x18 != 0x18 {
		t.Fatalf("RSOC READ(10): %x", d)
	}
	f.expectSense(first(f.run(nexusA, []byte{opMaintenanceIn, saReportSupportOps, 0x01, opPRIn, 0, 0, 0, 0, 1, 0, 0, 0}, nil, 256)), SenseIllegalRequest, ascInvalidFieldCDB, "RSOC option 1 for a service-action command")
	r, d = f.run(nexusA, []byte{opMaintenanceIn, saReportSupportOps, 0x01, 0xC5, 0, 0, 0, 0, 1, 0, 0, 0}, nil, 256)
	f.expectGood(r, "RSOC unsupported")
	if d[1]&0x07 != 1 {
		t.Fatalf("unsupported opcode SUPPORT = %d", d[1]&0x07)
	}
}

func TestUnknownAndMalformedCDBs(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.expectSense(first(f.run(nexusA, []byte{0xC5, 0, 0, 0, 0, 0}, nil, 0)), SenseIllegalRequest, ascInvalidOpcode, "vendor opcode")
	f.expectSense(f.dev.Execute(&Command{Nexus: nexusA}), SenseIllegalRequest, ascInvalidOpcode, "empty CDB")
	f.expectSense(first(f.run(nexusA, []byte{opRead16, 0, 0}, nil, 512)), SenseIllegalRequest, ascInvalidFieldCDB, "truncated READ(16)")
	// Every opcode with every CDB length and junk: no panic, no write outside the volume.
	junk := pattern(16, 0xF3)
	for op := 0; op < 256; op++ {
		for n := 1; n <= 16; n++ {
			cdb := append([]byte{byte(op)}, junk[:n-1]...)
			for _, exp := range []int{0, 512, 4096} {
				cmd := &Command{Nexus: nexusA, CDB: cdb, ExpectedLen: uint32(exp), DataIn: make([]byte, exp), DataOut: pattern(exp, byte(op))}
				r := f.dev.Execute(cmd)
				if r.DataInLen > exp || r.DataInLen < 0 {
					t.Fatalf("op %#x len %d: DataInLen %d with buffer %d", op, n, r.DataInLen, exp)
				}
				if r.Status == StatusCheckCondition && len(r.Sense) != senseLen {
					t.Fatalf("op %#x: CHECK CONDITION without sense", op)
				}
			}
		}
	}
	if f.vol.Size() != int64(testBlocks)*512 {
		t.Fatal("volume size changed")
	}
}

// The data path allocates nothing per I/O.
func TestReadWriteDoNotAllocate(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.t = t
	in := make([]byte, 4096)
	out := pattern(4096, 1)
	rd := &Command{Nexus: nexusA, CDB: read10(8, 8), ExpectedLen: 4096, DataIn: in}
	wr := &Command{Nexus: nexusA, CDB: write10(8, 8, 0), ExpectedLen: 4096, DataOut: out}
	f.dev.Execute(rd)
	if a := testing.AllocsPerRun(200, func() { f.dev.Execute(wr) }); a != 0 {
		t.Fatalf("WRITE(10) allocates %.1f times per command", a)
	}
	if a := testing.AllocsPerRun(200, func() { f.dev.Execute(rd) }); a != 0 {
		t.Fatalf("READ(10) allocates %.1f times per command", a)
	}
	// With a registration and a reservation held by another nexus every command is checked
	// against the PR rules; that check must not allocate either.
	f.expectGood(f.prOut(nexusB, saRegister, 0, 0, 0xB), "register B")
	f.expectGood(f.prOut(nexusB, saReserve, prWERO, 0xB, 0), "B reserves WE-RO")
	if r := f.dev.Execute(rd); r.Status != StatusGood {
		t.Fatalf("READ(10) of a non-registrant under WE-RO: status %#x", r.Status)
	}
	if a := testing.AllocsPerRun(200, func() { f.dev.Execute(rd) }); a != 0 {
		t.Fatalf("READ(10) under a persistent reservation allocates %.1f times per command", a)
	}
}

func BenchmarkRead4K(b *testing.B) {
	f := newFixture(b, LUConfig{WriteCache: true})
	in := make([]byte, 4096)
	cmd := &Command{Nexus: nexusA, CDB: read10(8, 8), ExpectedLen: 4096, DataIn: in}
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		f.dev.Execute(cmd)
	}
}

func BenchmarkWrite4K(b *testing.B) {
	f := newFixture(b, LUConfig{WriteCache: true})
	cmd := &Command{Nexus: nexusA, CDB: write10(8, 8, 0), ExpectedLen: 4096, DataOut: make([]byte, 4096)}
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		f.dev.Execute(cmd)
	}
}

// I/O, reservations, unit attentions and resets from many nexuses at once: -race must stay
// quiet and every answer must be a valid status.
func TestConcurrentStateChangesAndIO(t *testing.T) {
	f := newFixture(t, LUConfig{WriteCache: true})
	f.t = t
	var wg sync.WaitGroup
	var bad atomic.Int64
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := &Nexus{ID: uint64(500 + w), InitiatorName: "iqn.2026-01.test:w", ISID: [6]byte{0, 0, 0, 0, 0, byte(w)}}
			key := uint64(w + 1)
			in := make([]byte, 4096)
			out := pattern(4096, byte(w))
			for i := 0; i < 200; i++ {
				var cdb, pd []byte
				var cmd *Command
				switch i % 8 {
				case 0:
					cdb, pd = prOut(saRegisterIgnore, 0, 0, key)
				case 1:
					cdb, pd = prOut(saReserve, prWEAR, key, 0)
				case 2:
					cdb, pd = prOut(saRelease, prWEAR, key, 0)
				case 3:
					cdb, pd = prOut(saRegisterIgnore, 0, 0, 0)
				case 4:
					cdb = []byte{opReserve6, 0, 0, 0, 0, 0}
				case 5:
					cdb = []byte{opRelease6, 0, 0, 0, 0, 0}
				case 6:
					f.dev.LUNReset(0, n)
					continue
				}
				if cdb != nil {
					cmd = &Command{Nexus: n, CDB: cdb, ExpectedLen: uint32(len(pd)), DataOut: pd}
				} else if i%2 == 0 {
					cmd = &Command{Nexus: n, CDB: write10(uint32(8*w), 8, 0), ExpectedLen: 4096, DataOut: out}
				} else {
					cmd = &Command{Nexus: n, CDB: read10(uint32(8*w), 8), ExpectedLen: 4096, DataIn: in}
				}
				switch r := f.dev.Execute(cmd); r.Status {
				case StatusGood, StatusReservationConflict:
				case StatusCheckCondition:
					if k, _ := senseOf(r); k != SenseUnitAttention && k != SenseIllegalRequest {
						bad.Add(1)
					}
				default:
					bad.Add(1)
				}
			}
			f.dev.NexusLoss(n)
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d commands got an unexpected status", bad.Load())
	}
}

// SPC-4: TPGS=00b means REPORT TARGET PORT GROUPS is not supported, so the standard INQUIRY,
// RTPG and the target port group designator of VPD 0x83 must tell the same story.
func TestTargetPortGroupSupportIsReportedConsistently(t *testing.T) {
	f := newFixture(t, LUConfig{})
	f.t = t
	f.clearUA(nexusA)
	_, inq := f.run(nexusA, []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36)
	tpgs := inq[5] >> 4 & 3
	rtpg := make([]byte, 12)
	rtpg[0], rtpg[1] = opMaintenanceIn, saReportTPG
	binary.BigEndian.PutUint32(rtpg[6:], 64)
	r, groups := f.run(nexusA, rtpg, nil, 64)
	_, vpd := f.run(nexusA, []byte{opInquiry, 1, vpdDeviceID, 0, 255, 0}, nil, 255)
	hasGroup := false
	for d := vpd[4:]; len(d) >= 4 && len(d) >= 4+int(d[3]); d = d[4+int(d[3]):] {
		if d[1]&0x0F == 0x05 {
			hasGroup = true
		}
	}
	if tpgs != 1 || r.Status != StatusGood || len(groups) < 12 || !hasGroup {
		t.Fatalf("TPGS=%d, RTPG status %d (%d bytes), VPD 0x83 target port group %v: want implicit ALUA with both",
			tpgs, r.Status, len(groups), hasGroup)
	}
}
