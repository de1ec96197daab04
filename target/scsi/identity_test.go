//go:build linux

package scsi

import (
	"bytes"
	"testing"

	"nstarget/backend"
)

// vpdOf opens volume name in the pool at dir, as a server start would, and returns its Device
// Identification (0x83) and Unit Serial Number (0x80) pages; the pool is closed again.
func vpdOf(t *testing.T, dir, name string) (devID, serial []byte) {
	t.Helper()
	pool, err := backend.OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	vol, err := pool.Open(name, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	lu, err := NewLU(vol, LUConfig{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, dev: NewDevice(map[uint64]*LU{0: lu}), lu: lu}
	r, d := f.run(nexusA, []byte{opInquiry, 1, vpdDeviceID, 0, 255, 0}, nil, 255)
	f.expectGood(r, "VPD 0x83")
	devID = bytes.Clone(d)
	r, d = f.run(nexusA, []byte{opInquiry, 1, vpdSerial, 0, 255, 0}, nil, 255)
	f.expectGood(r, "VPD 0x80")
	return devID, bytes.Clone(d)
}

func TestDeviceIdentifiersStayTheSameAcrossPoolReopen(t *testing.T) {
	dir := t.TempDir()
	id1, ser1 := vpdOf(t, dir, "vol")
	id2, ser2 := vpdOf(t, dir, "vol")
	if !bytes.Equal(id1, id2) || !bytes.Equal(ser1, ser2) {
		t.Fatalf("identifiers changed across reopen:\n0x83 %x\n0x83 %x\n0x80 %q\n0x80 %q", id1, id2, ser1, ser2)
	}
	if id1[8]>>4 != 3 {
		t.Fatalf("first designator is not NAA 3: %x", id1[4:16])
	}
}

func TestDeviceIdentifiersDifferBetweenPoolsWithTheSameVolumeName(t *testing.T) {
	id1, ser1 := vpdOf(t, t.TempDir(), "vol")
	id2, ser2 := vpdOf(t, t.TempDir(), "vol")
	// NAA (bytes 8..16) and EUI-64 designators, and the serial, must all differ: multipath
	// merges paths on any of them.
	if bytes.Equal(id1[8:16], id2[8:16]) || bytes.Equal(id1[20:28], id2[20:28]) || bytes.Equal(ser1, ser2) {
		t.Fatalf("two pools present the same disk:\n0x83 %x\n0x83 %x\n0x80 %q\n0x80 %q", id1, id2, ser1, ser2)
	}
}

func TestDeviceIdentifiersDifferBetweenVolumesOfOnePool(t *testing.T) {
	dir := t.TempDir()
	id1, ser1 := vpdOf(t, dir, "a")
	id2, ser2 := vpdOf(t, dir, "b")
	if bytes.Equal(id1[8:16], id2[8:16]) || bytes.Equal(ser1, ser2) {
		t.Fatalf("two volumes share an identifier: %x / %x, %q / %q", id1[8:16], id2[8:16], ser1, ser2)
	}
}
