package scsi

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// The LUN field as SAM-5 writes it, one vector per addressing method and edge.
var lunVectors = []struct {
	lun uint64
	raw [8]byte
}{
	{0, [8]byte{0x00, 0x00}},
	{3, [8]byte{0x00, 0x03}},
	{255, [8]byte{0x00, 0xFF}},
	{256, [8]byte{0x41, 0x00}},
	{300, [8]byte{0x41, 0x2C}},
	{16383, [8]byte{0x7F, 0xFF}},
}

func TestEncodeLUNKnownVectors(t *testing.T) {
	for _, v := range lunVectors {
		want := binary.BigEndian.Uint64(v.raw[:])
		if got := EncodeLUN(v.lun); got != want {
			t.Errorf("EncodeLUN(%d) = %016x, want %016x", v.lun, got, want)
		}
		if got := DecodeLUN(want); got != v.lun {
			t.Errorf("DecodeLUN(%016x) = %d, want %d", want, got, v.lun)
		}
	}
}

func TestLUNRoundTrip(t *testing.T) {
	for lun := uint64(0); lun < 1<<14; lun++ {
		if got := DecodeLUN(EncodeLUN(lun)); got != lun {
			t.Fatalf("DecodeLUN(EncodeLUN(%d)) = %d", lun, got)
		}
	}
}

func TestDecodeLUNOtherForms(t *testing.T) {
	cases := []struct {
		raw  uint64
		want uint64
		why  string
	}{
		// Only the first level counts: initiators may leave junk in the lower levels.
		{0x0005_1234_0000_0000, 5, "peripheral, lower levels ignored"},
		{0x4105_0000_0000_0001, 0x105, "flat space, lower levels ignored"},
		// LUN 7 behind bus 0x3F is not our LUN 7.
		{0x3F07_0000_0000_0000, 0x3F07_0000_0000_0000, "peripheral on another bus passes through"},
		{0x8001_0000_0000_0000, 0x8001_0000_0000_0000, "logical unit addressing passes through"},
		{0xC000_0000_0000_0000, 0xC000_0000_0000_0000, "extended addressing passes through"},
	}
	for _, c := range cases {
		if got := DecodeLUN(c.raw); got != c.want {
			t.Errorf("%s: DecodeLUN(%016x) = %x, want %x", c.why, c.raw, got, c.want)
		}
	}
	// What DecodeLUN passes through, EncodeLUN gives back unchanged.
	for _, raw := range []uint64{0x3F07_0000_0000_0000, 0x8001_0000_0000_0000, 0xC000_0000_0000_0000} {
		if got := EncodeLUN(DecodeLUN(raw)); got != raw {
			t.Errorf("EncodeLUN(DecodeLUN(%016x)) = %016x", raw, got)
		}
	}
}

func TestCheckConditionSense(t *testing.T) {
	r := CheckCondition(SenseAbortedCommand, 0x4B, 0x05)
	want := []byte{0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0x05, 0, 0, 0, 0}
	if r.Status != StatusCheckCondition || !bytes.Equal(r.Sense, want) {
		t.Fatalf("CheckCondition(ABORTED COMMAND, 4B/05) = %#x %x, want %#x %x", r.Status, r.Sense, StatusCheckCondition, want)
	}
	if r.DataInLen != 0 || r.Wanted != 0 {
		t.Fatalf("CheckCondition moved data: %+v", r)
	}
	// The same sense the device itself gives for the same condition.
	if dev, own := CheckCondition(SenseIllegalRequest, 0x25, 0x00), illegal(ascLUNotSupported); !bytes.Equal(dev.Sense, own.Sense) {
		t.Fatalf("transport sense %x differs from the device's %x", dev.Sense, own.Sense)
	}
	// A caller that keeps or edits its sense must not change anyone else's.
	a := CheckCondition(SenseIllegalRequest, 0x24, 0x00)
	a.Sense[12] = 0xFF
	if b := CheckCondition(SenseIllegalRequest, 0x24, 0x00); b.Sense[12] != 0x24 {
		t.Fatalf("CheckCondition results share their sense buffer: %x", b.Sense)
	}
}
