//go:build linux

// These tests run on the real volume pool (fdatasync, hole punching, SEEK_DATA), which is
// Linux only.

package scsi

import (
	"os"
	"testing"
)

// FuzzExecute feeds arbitrary CDBs, Data-Out and expected lengths to a real LU: the device
// must never panic, never report more Data-In than the buffer holds, always give sense data
// with CHECK CONDITION, and never change the volume's size.
func FuzzExecute(f *testing.F) {
	f.Add([]byte{opRead10, 0, 0, 0, 0, 1, 0, 0, 1, 0}, []byte{}, uint16(512))
	f.Add([]byte{opWrite16, 0x08, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0}, make([]byte, 512), uint16(512))
	f.Add([]byte{opPROut, 0, 1, 0, 0, 0, 0, 0, 24, 0}, make([]byte, 24), uint16(24))
	f.Add([]byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, []byte{0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0}, uint16(24))
	fx := newFixture(f, LUConfig{WriteCache: true})
	size := fx.vol.Size()
	nexuses := []*Nexus{nexusA, nexusB}
	f.Fuzz(func(t *testing.T, cdb []byte, out []byte, exp uint16) {
		if len(out) > int(exp) {
			out = out[:exp]
		}
		n := nexuses[len(cdb)%2]
		cmd := &Command{Nexus: n, CDB: cdb, ExpectedLen: uint32(exp), DataIn: make([]byte, exp), DataOut: out}
		r := fx.dev.Execute(cmd)
		if r.DataInLen < 0 || r.DataInLen > len(cmd.DataIn) {
			t.Fatalf("DataInLen %d with a %d-byte buffer", r.DataInLen, len(cmd.DataIn))
		}
		if r.Status == StatusCheckCondition && len(r.Sense) < 14 {
			t.Fatalf("CHECK CONDITION with %d bytes of sense", len(r.Sense))
		}
		switch r.Status {
		case StatusGood, StatusCheckCondition, StatusReservationConflict:
		default:
			t.Fatalf("status %#x", r.Status)
		}
		// The file itself, not only the size the volume remembers: nothing may grow or
		// shrink it.
		st, err := os.Stat(fx.path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != size || fx.vol.Size() != size {
			t.Fatalf("volume size changed: file %d, volume %d, want %d", st.Size(), fx.vol.Size(), size)
		}
		// Keep the LU usable for the next input: drop reservations this input may have made.
		fx.dev.NexusLoss(nexusA)
		fx.dev.NexusLoss(nexusB)
	})
}
