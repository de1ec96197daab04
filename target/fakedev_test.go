package target

import (
	"encoding/binary"
	"sync"
	"time"

	"nstarget/target/scsi"
)

// ramDevice is a throwaway in-memory SCSI device for unit tests of the iSCSI layer only (PDU
// flow, windows, R2T, residuals); conformance runs against the real target/scsi.
type ramDevice struct {
	mu      sync.Mutex
	data    []byte
	resets  int
	losses  int
	hold    chan struct{} // if set, Execute of opcode 0x2a waits on it (abort tests)
	slowLBA uint32        // READ(10) of this LBA (if non-zero) takes at least slowRead
	gate    chan struct{} // if set, READ(10) of LBA 11 waits until it is closed
	delay   time.Duration // every READ/WRITE takes at least this long
}

const ramBlock = 512

// slowRead is well above the inline-execution threshold (150 µs): a READ that takes it
// switches the connection to one goroutine per command.
const slowRead = time.Millisecond

func newRAMDevice(size int) *ramDevice { return &ramDevice{data: make([]byte, size)} }

var illegalReq = []byte{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0}

func (d *ramDevice) Execute(cmd *scsi.Command) scsi.Result {
	cdb := cmd.CDB
	if cmd.LUN != 0 && cdb[0] != 0xa0 {
		return scsi.Result{Status: scsi.StatusCheckCondition, Sense: []byte{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x25, 0}}
	}
	in := func(b []byte, alloc uint32) scsi.Result {
		n := copy(cmd.DataIn, b[:min(int(alloc), len(b))])
		return scsi.Result{DataInLen: n, Wanted: alloc}
	}
	rw := func(lba uint64, blocks uint32, write bool) scsi.Result {
		want := blocks * ramBlock
		off := lba * ramBlock
		if off+uint64(want) > uint64(len(d.data)) {
			return scsi.Result{Status: scsi.StatusCheckCondition, Sense: []byte{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0}, Wanted: want}
		}
		if d.delay > 0 {
			time.Sleep(d.delay)
		}
		if write && d.hold != nil {
			<-d.hold
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if write {
			n := copy(d.data[off:off+uint64(want)], cmd.DataOut)
			_ = n
			return scsi.Result{Wanted: want}
		}
		n := copy(cmd.DataIn, d.data[off:off+uint64(want)])
		return scsi.Result{DataInLen: n, Wanted: want}
	}
	switch cdb[0] {
	case 0x00: // TEST UNIT READY
		return scsi.Result{}
	case 0x12: // INQUIRY
		if cdb[1]&1 != 0 {
			return in([]byte{0, cdb[2], 0, 0}, uint32(binary.BigEndian.Uint16(cdb[3:5])))
		}
		b := make([]byte, 36)
		b[2], b[3], b[4] = 6, 2, 31
		copy(b[8:], "NSTEST  RAMDISK         0001")
		return in(b, uint32(binary.BigEndian.Uint16(cdb[3:5])))
	case 0x25: // READ CAPACITY 10
		b := make([]byte, 8)
		binary.BigEndian.PutUint32(b, uint32(len(d.data)/ramBlock-1))
		binary.BigEndian.PutUint32(b[4:], ramBlock)
		return in(b, 8)
	case 0x9e: // READ CAPACITY 16
		b := make([]byte, 32)
		binary.BigEndian.PutUint64(b, uint64(len(d.data)/ramBlock-1))
		binary.BigEndian.PutUint32(b[8:], ramBlock)
		return in(b, binary.BigEndian.Uint32(cdb[10:14]))
	case 0xa0: // REPORT LUNS
		b := make([]byte, 16)
		b[3] = 8
		return in(b, binary.BigEndian.Uint32(cdb[6:10]))
	case 0x28:
		if d.slowLBA != 0 && binary.BigEndian.Uint32(cdb[2:6]) == d.slowLBA {
			time.Sleep(slowRead)
		}
		if d.gate != nil && binary.BigEndian.Uint32(cdb[2:6]) == 11 {
			<-d.gate
		}
		return rw(uint64(binary.BigEndian.Uint32(cdb[2:6])), uint32(binary.BigEndian.Uint16(cdb[7:9])), false)
	case 0x2a:
		return rw(uint64(binary.BigEndian.Uint32(cdb[2:6])), uint32(binary.BigEndian.Uint16(cdb[7:9])), true)
	case 0x88:
		return rw(binary.BigEndian.Uint64(cdb[2:10]), binary.BigEndian.Uint32(cdb[10:14]), false)
	case 0x8a:
		return rw(binary.BigEndian.Uint64(cdb[2:10]), binary.BigEndian.Uint32(cdb[10:14]), true)
	case 0x35, 0x91: // SYNCHRONIZE CACHE
		return scsi.Result{}
	case 0x1a: // MODE SENSE 6
		return in([]byte{3, 0, 0, 0}, uint32(cdb[4]))
	}
	return scsi.Result{Status: scsi.StatusCheckCondition, Sense: illegalReq}
}

func (d *ramDevice) LUNReset(lun uint64, nexus *scsi.Nexus) error {
	d.mu.Lock()
	d.resets++
	d.mu.Unlock()
	return nil
}
func (d *ramDevice) TargetReset(nexus *scsi.Nexus) { d.LUNReset(0, nexus) }
func (d *ramDevice) NexusLoss(nexus *scsi.Nexus) {
	d.mu.Lock()
	d.losses++
	d.mu.Unlock()
}

func (d *ramDevice) Attach(nexus *scsi.Nexus)         {}
func (d *ramDevice) SetLUNs(luns map[uint64]*scsi.LU) {}
