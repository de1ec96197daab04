package scsi

import (
	"errors"
	"syscall"
)

// asc is an additional sense code and qualifier packed as 0xAAQQ.
type asc uint16

func ascCode(code, qualifier byte) asc { return asc(code)<<8 | asc(qualifier) }

const (
	ascNone                   asc = 0x0000
	ascParamListLength        asc = 0x1A00
	ascMiscompareVerify       asc = 0x1D00
	ascInvalidOpcode          asc = 0x2000
	ascLBAOutOfRange          asc = 0x2100
	ascInvalidFieldCDB        asc = 0x2400
	ascLUNotSupported         asc = 0x2500
	ascInvalidFieldParam      asc = 0x2600
	ascInvalidReleasePR       asc = 0x2604
	ascWriteProtected         asc = 0x2700
	ascPowerOnReset           asc = 0x2900
	ascModeParamsChanged      asc = 0x2A01
	ascReservationsPreempted  asc = 0x2A03
	ascReservationsReleased   asc = 0x2A04
	ascRegistrationsPreempted asc = 0x2A05
	ascSavingNotSupported     asc = 0x3900
	ascUnrecoveredReadError   asc = 0x1100
	ascWriteError             asc = 0x0C00
	ascSpaceAllocFailed       asc = 0x2707
	ascCapacityChanged        asc = 0x2A09
	ascReportedLUNsChanged    asc = 0x3F0E
	ascSoftThresholdReached   asc = 0x3807
)

// senseLen is the fixed-format sense length we return (SPC-5 4.4.3).
const senseLen = 18

// senseField points at the offending byte/bit for ILLEGAL REQUEST (sense-key specific field
// pointer); byte < 0 means none.
type senseField struct {
	cdb  bool
	byte int
	bit  int // -1: no bit pointer
}

var noField = senseField{byte: -1, bit: -1}

func cdbField(b, bit int) senseField   { return senseField{cdb: true, byte: b, bit: bit} }
func paramField(b, bit int) senseField { return senseField{cdb: false, byte: b, bit: bit} }

// buildSense makes fixed-format sense data. Error paths only, so the allocation is fine.
func buildSense(key byte, code asc, info uint32, infoValid bool, f senseField) []byte {
	s := make([]byte, senseLen)
	s[0] = 0x70
	if infoValid {
		s[0] |= 0x80
		s[3] = byte(info >> 24)
		s[4] = byte(info >> 16)
		s[5] = byte(info >> 8)
		s[6] = byte(info)
	}
	s[2] = key & 0x0F
	s[7] = senseLen - 8
	s[12] = byte(code >> 8)
	s[13] = byte(code)
	if f.byte >= 0 && f.byte <= 0xFFFF {
		s[15] = 0x80 // SKSV
		if f.cdb {
			s[15] |= 0x40
		}
		if f.bit >= 0 && f.bit < 8 {
			s[15] |= 0x08 | byte(f.bit)
		}
		s[16] = byte(f.byte >> 8)
		s[17] = byte(f.byte)
	}
	return s
}

// checkCond allocates its sense for every call: Result.Sense goes to the transport, which
// may hold it while other commands fail, so no two results share one.
func checkCond(key byte, code asc) Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(key, code, 0, false, noField)}
}

func illegal(code asc) Result { return checkCond(SenseIllegalRequest, code) }

func invalidOpcode() Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(SenseIllegalRequest, ascInvalidOpcode, 0, false, cdbField(0, 7))}
}

func invalidCDB(b, bit int) Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(SenseIllegalRequest, ascInvalidFieldCDB, 0, false, cdbField(b, bit))}
}

func invalidParam(b, bit int) Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(SenseIllegalRequest, ascInvalidFieldParam, 0, false, paramField(b, bit))}
}

func lbaOutOfRange() Result { return illegal(ascLBAOutOfRange) }

func paramListLengthError() Result { return illegal(ascParamListLength) }

func dataProtect() Result { return checkCond(SenseDataProtect, ascWriteProtected) }

func reservationConflict() Result { return Result{Status: StatusReservationConflict} }

// miscompare reports the byte offset of the first difference in the INFORMATION field.
func miscompare(offset uint32) Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(SenseMiscompare, ascMiscompareVerify, offset, true, noField)}
}

func readError() Result { return checkCond(SenseMediumError, ascUnrecoveredReadError) }

// writeError answers a failed write. A pool out of space (thin volumes over a full file
// system, or a quota) is SPACE ALLOCATION FAILED WRITE PROTECT (SBC-4): initiators report that
// as a full thin pool (Linux: "critical space allocation") and stop writing, instead of
// taking the disk for broken; anything else is WRITE ERROR.
func writeError(err error) Result {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return checkCond(SenseDataProtect, ascSpaceAllocFailed)
	}
	return checkCond(SenseMediumError, ascWriteError)
}

// IsSpaceAllocationFailure reports whether sense says SPACE ALLOCATION FAILED WRITE PROTECT,
// so the transport can log a full pool with the tenant it hit.
func IsSpaceAllocationFailure(sense []byte) bool {
	return len(sense) >= 14 && sense[2]&0x0f == SenseDataProtect && sense[12] == 0x27 && sense[13] == 0x07
}

func good() Result { return Result{Status: StatusGood} }
