package scsi

import (
	"math/bits"

	"nstarget/backend"
)

// Thin provisioning: volumes are sparse, so the pool under them can fill before they do. The
// pool's fill level is reported in the Logical Block Provisioning log page (SBC-4 6.5.5), in
// threshold sets of 1 MiB (the LBP VPD page's THRESHOLD EXPONENT); crossing the operator's
// threshold is a THIN PROVISIONING SOFT THRESHOLD REACHED unit attention (ThresholdReached).

const (
	logSupportedPages = 0x00
	logLBP            = 0x0C
	thresholdSetBytes = 1 << 20
)

// thresholdExponent is log2 of the blocks in one threshold set.
func (lu *LU) thresholdExponent() byte {
	return byte(bits.TrailingZeros32(thresholdSetBytes / lu.bs))
}

// logSense answers LOG SENSE for the supported-pages page and the LBP page; both are current
// cumulative values (PC 01b), which is also what any other PC gets.
func (lu *LU) logSense(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[1]&0x01 != 0 {
		return invalidCDB(1, 0) // SP: saving parameters is not supported
	}
	if be16(cdb[5:7]) != 0 {
		return invalidCDB(5, -1) // PARAMETER POINTER: every page here starts at its first
	}
	page, sub := cdb[2]&0x3F, cdb[3]
	alloc := uint32(be16(cdb[7:9]))
	if sub != 0 {
		return invalidCDB(3, -1)
	}
	var d []byte
	switch page {
	case logSupportedPages:
		d = []byte{logSupportedPages, 0, 0, 2, logSupportedPages, logLBP}
	case logLBP:
		var ok bool
		if d, ok = lu.lbpLogPage(); !ok {
			return readError()
		}
	default:
		return invalidCDB(2, 5)
	}
	return dataIn(cmd, d, alloc)
}

// lbpLogPage is the Logical Block Provisioning log page: available resources of the shared
// pool (scope: not dedicated to this LU) and the resources this LU's volume uses.
func (lu *LU) lbpLogPage() ([]byte, bool) {
	d := []byte{logLBP, 0, 0, 0}
	sr, ok := lu.vol.(backend.SpaceReporter)
	if !ok {
		// A backend that cannot tell: an empty page says "nothing to report".
		return d, true
	}
	sp, err := sr.Space()
	if err != nil {
		return nil, false
	}
	param := func(code uint16, bytes int64, scope byte) {
		var p [12]byte
		put16(p[0:], code)
		p[2] = 0x03 // FORMAT AND LINKING: binary
		p[3] = 8
		put32(p[4:], uint32(min(bytes/thresholdSetBytes, 0xFFFFFFFF)))
		p[8] = scope
		d = append(d, p[:]...)
	}
	param(0x0001, sp.PoolFree, 0x02)  // available LBA mapping resources, shared
	param(0x0002, sp.Allocated, 0x01) // used by this LU, dedicated
	put16(d[2:], uint16(len(d)-4))
	return d, true
}
