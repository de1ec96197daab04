package target

import (
	"strconv"
	"strings"
)

// params are the operational parameters of a session/connection after negotiation (RFC 7143
// §13). Lengths are bytes.
type params struct {
	HeaderDigest        bool
	DataDigest          bool
	MaxConnections      uint32
	InitialR2T          bool
	ImmediateData       bool
	InitiatorRecvDSL    uint32 // MaxRecvDataSegmentLength declared by the initiator: bounds what we send
	TargetRecvDSL       uint32 // ours: bounds what the initiator sends
	MaxBurstLength      uint32
	FirstBurstLength    uint32
	DefaultTime2Wait    uint32
	DefaultTime2Retain  uint32
	MaxOutstandingR2T   uint32
	DataPDUInOrder      bool
	DataSequenceInOrder bool
	ErrorRecoveryLevel  uint32
}

// defaultParams are the RFC defaults that apply to anything not negotiated.
func defaultParams(targetRecvDSL uint32) params {
	return params{
		MaxConnections:      1,
		InitialR2T:          true,
		ImmediateData:       true,
		InitiatorRecvDSL:    8192,
		TargetRecvDSL:       targetRecvDSL,
		MaxBurstLength:      262144,
		FirstBurstLength:    65536,
		DefaultTime2Wait:    2,
		DefaultTime2Retain:  20,
		MaxOutstandingR2T:   1,
		DataPDUInOrder:      true,
		DataSequenceInOrder: true,
	}
}

// Policy is what this target is willing to do; negotiation intersects it with the offer.
type Policy struct {
	MaxRecvDataSegmentLength uint32 // we declare this
	MaxBurstLength           uint32
	FirstBurstLength         uint32
	MaxOutstandingR2T        uint32
	DefaultTime2Wait         uint32
	DefaultTime2Retain       uint32
}

// DefaultPolicy offers large segments and bursts: fewer PDUs per byte is the main lever for
// sequential throughput.
func DefaultPolicy() Policy {
	return Policy{
		MaxRecvDataSegmentLength: 256 * 1024,
		MaxBurstLength:           1024 * 1024,
		FirstBurstLength:         256 * 1024,
		MaxOutstandingR2T:        8,
		DefaultTime2Wait:         2,
		DefaultTime2Retain:       0,
	}
}

const (
	valReject        = "Reject"
	valIrrelevant    = "Irrelevant"
	valNotUnderstood = "NotUnderstood"
)

// keyKind classifies keys for the negotiation table.
type keyKind int

const (
	kindDeclarative keyKind = iota
	kindList
	kindMin
	kindMax
	kindOr
	kindAnd
	kindTargetOnly
)

type keyDef struct {
	kind        keyKind
	lo, hi      uint64
	notDiscover bool // Irrelevant in discovery sessions
}

var keyTable = map[string]keyDef{
	"HeaderDigest":             {kind: kindList},
	"DataDigest":               {kind: kindList},
	"AuthMethod":               {kind: kindList},
	"MaxConnections":           {kind: kindMin, lo: 1, hi: 65535, notDiscover: true},
	"InitialR2T":               {kind: kindOr, notDiscover: true},
	"ImmediateData":            {kind: kindAnd, notDiscover: true},
	"MaxRecvDataSegmentLength": {kind: kindDeclarative, lo: 512, hi: 1<<24 - 1},
	"MaxBurstLength":           {kind: kindMin, lo: 512, hi: 1<<24 - 1, notDiscover: true},
	"FirstBurstLength":         {kind: kindMin, lo: 512, hi: 1<<24 - 1, notDiscover: true},
	"DefaultTime2Wait":         {kind: kindMax, lo: 0, hi: 3600},
	"DefaultTime2Retain":       {kind: kindMin, lo: 0, hi: 3600},
	"MaxOutstandingR2T":        {kind: kindMin, lo: 1, hi: 65535, notDiscover: true},
	"DataPDUInOrder":           {kind: kindOr, notDiscover: true},
	"DataSequenceInOrder":      {kind: kindOr, notDiscover: true},
	"ErrorRecoveryLevel":       {kind: kindMin, lo: 0, hi: 2},
	"IFMarker":                 {kind: kindAnd},
	"OFMarker":                 {kind: kindAnd},
	"OFMarkInt":                {kind: kindDeclarative},
	"IFMarkInt":                {kind: kindDeclarative},
	"SessionType":              {kind: kindDeclarative},
	"InitiatorName":            {kind: kindDeclarative},
	"InitiatorAlias":           {kind: kindDeclarative},
	"TargetName":               {kind: kindDeclarative},
	"TargetAlias":              {kind: kindTargetOnly},
	"TargetAddress":            {kind: kindTargetOnly},
	"TargetPortalGroupTag":     {kind: kindTargetOnly},
	"SendTargets":              {kind: kindTargetOnly}, // only valid in Text requests
	"TaskReporting":            {kind: kindList},
	"iSCSIProtocolLevel":       {kind: kindMin, lo: 0, hi: 31},
}

func parseBool(v string) (bool, bool) {
	switch v {
	case "Yes":
		return true, true
	case "No":
		return false, true
	}
	return false, false
}

func fmtBool(b bool) string {
	if b {
		return "Yes"
	}
	return "No"
}

func parseNum(v string, lo, hi uint64) (uint64, bool) {
	var n uint64
	var err error
	switch {
	case strings.HasPrefix(v, "0x") || strings.HasPrefix(v, "0X"):
		n, err = strconv.ParseUint(v[2:], 16, 64)
	default:
		n, err = strconv.ParseUint(v, 10, 64)
	}
	if err != nil || n < lo || n > hi {
		return 0, false
	}
	return n, true
}

// negotiateKey applies one offered key to p and returns the response pair (ok=false
// when the key needs no answer). discovery makes session-only keys Irrelevant.
func negotiateKey(p *params, pol *Policy, kv textKV, discovery bool) (resp textKV, answer bool) {
	def, known := keyTable[kv.Key]
	if !known {
		return textKV{kv.Key, valNotUnderstood}, true
	}
	switch kv.Value {
	case valNotUnderstood, valIrrelevant, valReject:
		// An answer to something we offered; we offer nothing negotiable.
		return textKV{}, false
	}
	if discovery && def.notDiscover {
		return textKV{kv.Key, valIrrelevant}, true
	}
	switch def.kind {
	case kindTargetOnly:
		return textKV{kv.Key, valReject}, true
	case kindDeclarative:
		if kv.Key == "MaxRecvDataSegmentLength" {
			n, ok := parseNum(kv.Value, def.lo, def.hi)
			if !ok {
				return textKV{kv.Key, valReject}, true
			}
			p.InitiatorRecvDSL = uint32(n)
		}
		if kv.Key == "OFMarkInt" || kv.Key == "IFMarkInt" {
			// Markers are always No here, so their intervals are moot.
			return textKV{kv.Key, valIrrelevant}, true
		}
		return textKV{}, false
	case kindList:
		choice := ""
		for _, v := range strings.Split(kv.Value, ",") {
			if listSupported(kv.Key, v) {
				choice = v
				break
			}
		}
		if choice == "" {
			return textKV{kv.Key, valReject}, true
		}
		switch kv.Key {
		case "HeaderDigest":
			p.HeaderDigest = choice == "CRC32C"
		case "DataDigest":
			p.DataDigest = choice == "CRC32C"
		}
		return textKV{kv.Key, choice}, true
	case kindMin, kindMax:
		n, ok := parseNum(kv.Value, def.lo, def.hi)
		if !ok {
			return textKV{kv.Key, valReject}, true
		}
		ours := uint64(0)
		switch kv.Key {
		case "MaxConnections":
			ours = 1
		case "MaxBurstLength":
			ours = uint64(pol.MaxBurstLength)
		case "FirstBurstLength":
			ours = uint64(pol.FirstBurstLength)
		case "DefaultTime2Wait":
			ours = uint64(pol.DefaultTime2Wait)
		case "DefaultTime2Retain":
			ours = uint64(pol.DefaultTime2Retain)
		case "MaxOutstandingR2T":
			ours = uint64(pol.MaxOutstandingR2T)
		case "ErrorRecoveryLevel":
			ours = 0
		case "iSCSIProtocolLevel":
			ours = 0
		}
		r := min(n, ours)
		if def.kind == kindMax {
			r = max(n, ours)
		}
		v := uint32(r)
		switch kv.Key {
		case "MaxConnections":
			p.MaxConnections = v
		case "MaxBurstLength":
			p.MaxBurstLength = v
		case "FirstBurstLength":
			p.FirstBurstLength = v
		case "DefaultTime2Wait":
			p.DefaultTime2Wait = v
		case "DefaultTime2Retain":
			p.DefaultTime2Retain = v
		case "MaxOutstandingR2T":
			p.MaxOutstandingR2T = v
		case "ErrorRecoveryLevel":
			p.ErrorRecoveryLevel = v
		}
		return textKV{kv.Key, strconv.FormatUint(r, 10)}, true
	case kindOr, kindAnd:
		b, ok := parseBool(kv.Value)
		if !ok {
			return textKV{kv.Key, valReject}, true
		}
		var r bool
		switch kv.Key {
		case "InitialR2T": // we do not require R2T before data: result is the offer
			r = b
			p.InitialR2T = r
		case "ImmediateData": // we accept immediate data: result is the offer
			r = b
			p.ImmediateData = r
		case "DataPDUInOrder", "DataSequenceInOrder": // we require in-order data
			r = true
		case "IFMarker", "OFMarker": // markers unsupported
			r = false
		}
		return textKV{kv.Key, fmtBool(r)}, true
	}
	return textKV{kv.Key, valNotUnderstood}, true
}

func listSupported(key, v string) bool {
	switch key {
	case "HeaderDigest", "DataDigest":
		return v == "None" || v == "CRC32C"
	case "AuthMethod":
		return v == "None"
	case "TaskReporting":
		return v == "RFC3720"
	}
	return false
}

// finish fixes up cross-key constraints after a negotiation round.
func (p *params) finish() {
	if p.FirstBurstLength > p.MaxBurstLength {
		p.FirstBurstLength = p.MaxBurstLength
	}
}
