package scsi

import (
	"errors"
	"syscall"
	"testing"

	"nstarget/backend"
)

// failingVolume fails every write with err, like a volume whose pool's file system is full.
type failingVolume struct {
	backend.Volume
	err error
}

func (v *failingVolume) WriteAt(p []byte, off int64) (int, error) { return 0, v.err }

func TestWriteToAFullPoolIsSpaceAllocationFailedNotAMediumError(t *testing.T) {
	for _, tc := range []struct {
		err       error
		key, asc  byte
		ascq      byte
		spaceFull bool
	}{
		{syscall.ENOSPC, SenseDataProtect, 0x27, 0x07, true},
		{syscall.EDQUOT, SenseDataProtect, 0x27, 0x07, true},
		{errors.New("EIO"), SenseMediumError, 0x0C, 0x00, false},
	} {
		f := newFixture(t, LUConfig{})
		lu, err := NewLU(&failingVolume{Volume: f.vol, err: tc.err}, LUConfig{})
		if err != nil {
			t.Fatal(err)
		}
		dev := NewDevice(map[uint64]*LU{0: lu})
		cdb := []byte{0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0}
		res := dev.Execute(&Command{Nexus: nexusA, CDB: cdb, ExpectedLen: 512, DataOut: make([]byte, 512)})
		if res.Status != StatusCheckCondition || len(res.Sense) < 14 || res.Sense[2]&0x0f != tc.key ||
			res.Sense[12] != tc.asc || res.Sense[13] != tc.ascq {
			t.Fatalf("%v: status %d sense % x", tc.err, res.Status, res.Sense)
		}
		if IsSpaceAllocationFailure(res.Sense) != tc.spaceFull {
			t.Fatalf("%v: IsSpaceAllocationFailure = %v", tc.err, !tc.spaceFull)
		}
	}
}
