package target

import (
	"encoding/binary"
	"strconv"
)

// Login status classes/details (RFC 7143 §11.13.5), as class<<8|detail.
const (
	loginSuccess            = 0x0000
	loginInitiatorError     = 0x0200
	loginAuthFailure        = 0x0201
	loginAuthorizationFail  = 0x0202
	loginNotFound           = 0x0203
	loginUnsupportedVersion = 0x0205
	loginTooManyConns       = 0x0206
	loginMissingParam       = 0x0207
	loginSessionTypeUnsup   = 0x0209
	loginNoSession          = 0x020a
	loginInvalidDuringLogin = 0x020b
	loginTargetError        = 0x0300
)

const (
	stageSecurity    = 0
	stageOperational = 1
	stageFullFeature = 3
)

// loginEnv is what the login state machine asks of the outside world; keeping it an interface
// leaves the machine free of sockets and server state (unit-tested directly).
type loginEnv interface {
	// findTarget resolves a TargetName for this tenant and checks the initiator against its
	// allow-list; status is loginNotFound or loginAuthorizationFail on refusal.
	findTarget(name, initiator string) (tg *Target, status uint16)
	// complete admits the session (reinstating an old one with the same ISID) and returns its
	// TSIH; status non-zero refuses the login.
	complete(ls *loginState) (tsih uint16, status uint16)
}

// loginState is the pure login state machine of one connection: feed it Login Requests with
// step, send what it returns.
type loginState struct {
	env    loginEnv
	policy Policy
	depth  uint32

	started       bool
	stage         byte
	isid          [6]byte
	tsih          uint16
	cid           uint16
	itt           uint32
	initiatorName string
	targetName    string
	discovery     bool
	target        *Target
	params        params
	statSN        uint32
	expCmdSN      uint32
	declaredDSL   bool
	partial       []byte // text of requests with the C bit set
	done          bool
}

func newLoginState(env loginEnv, pol Policy, depth uint32) *loginState {
	return &loginState{env: env, policy: pol, depth: depth, params: defaultParams(pol.MaxRecvDataSegmentLength)}
}

// step consumes one request and returns the response header and data. fail is true when the
// response carries a failure status (the caller sends it and closes the connection).
func (ls *loginState) step(req *frame) (resp bhs, data []byte, fail bool) {
	h := &req.BHS
	fl := h.flags()
	csg := (fl >> 2) & 3
	nsg := fl & 3
	transit := fl&flagTransit != 0
	cont := fl&flagContinue != 0

	resp[0] = opLoginResp
	resp[1] = csg << 2
	copy(resp[8:14], h[8:14])
	resp.setU32(offITT, h.itt())
	cmdSN := h.u32(offCmdSN)

	failWith := func(status uint16) (bhs, []byte, bool) {
		resp[1] = csg << 2
		resp[36] = byte(status >> 8)
		resp[37] = byte(status)
		ls.fillSN(&resp)
		return resp, nil, true
	}

	if h.opcode() != opLoginReq {
		return failWith(loginInvalidDuringLogin)
	}
	if h[3] > 0 || h[2] < h[3] { // VersionMin > 0 or Max < Min: we speak version 0 only
		return failWith(loginUnsupportedVersion)
	}
	if !ls.started {
		ls.started = true
		copy(ls.isid[:], h[8:14])
		ls.tsih = binary.BigEndian.Uint16(h[14:16])
		ls.cid = binary.BigEndian.Uint16(h[20:22])
		ls.itt = h.itt()
		ls.expCmdSN = cmdSN
		ls.statSN = h.u32(offExpStatSN)
		if csg != stageSecurity && csg != stageOperational {
			return failWith(loginInitiatorError)
		}
		ls.stage = csg
		if ls.tsih != 0 {
			// MaxConnections=1 and ERL 0: there is no existing session a connection could
			// join or be reinstated into.
			return failWith(loginNoSession)
		}
	} else {
		if [6]byte(h[8:14]) != ls.isid || binary.BigEndian.Uint16(h[14:16]) != ls.tsih {
			return failWith(loginInitiatorError)
		}
	}
	if csg != ls.stage || (transit && cont) {
		return failWith(loginInitiatorError)
	}
	if transit && (nsg <= csg || nsg == 2) {
		return failWith(loginInitiatorError)
	}
	if !transit && nsg != 0 && nsg <= csg {
		// NSG is meaningless without T; tolerated.
		nsg = 0
	}
	ls.expCmdSN = cmdSN

	text := append(ls.partial, req.Data...)
	if cont {
		if len(text) > maxLoginData {
			return failWith(loginInitiatorError)
		}
		ls.partial = text
		ls.fillSN(&resp)
		return resp, nil, false
	}
	ls.partial = nil
	kvs, _, err := parseTextKeys(text, false)
	if err != nil {
		return failWith(loginInitiatorError)
	}

	first := ls.initiatorName == ""
	seen := make(map[string]bool, len(kvs))
	sessionType := ""
	for _, kv := range kvs {
		if seen[kv.Key] {
			return failWith(loginInitiatorError)
		}
		seen[kv.Key] = true
		switch kv.Key {
		case "InitiatorName":
			if !first && kv.Value != ls.initiatorName {
				return failWith(loginInitiatorError)
			}
			ls.initiatorName = kv.Value
		case "SessionType":
			sessionType = kv.Value
		case "TargetName":
			ls.targetName = kv.Value
		}
	}
	if first {
		if ls.initiatorName == "" {
			return failWith(loginMissingParam)
		}
		switch sessionType {
		case "", "Normal":
		case "Discovery":
			ls.discovery = true
		default:
			return failWith(loginSessionTypeUnsup)
		}
		if !ls.discovery {
			if ls.targetName == "" {
				return failWith(loginMissingParam)
			}
			tg, st := ls.env.findTarget(ls.targetName, ls.initiatorName)
			if st != 0 {
				return failWith(st)
			}
			ls.target = tg
		}
	} else if sessionType != "" && (sessionType == "Discovery") != ls.discovery {
		return failWith(loginInitiatorError)
	}

	var out []textKV
	if first && !ls.discovery {
		out = append(out, textKV{"TargetPortalGroupTag", "1"})
		if ls.target != nil && ls.target.cfg.Alias != "" {
			out = append(out, textKV{"TargetAlias", ls.target.cfg.Alias})
		}
	}
	for _, kv := range kvs {
		switch kv.Key {
		case "InitiatorName", "InitiatorAlias", "SessionType", "TargetName":
			continue
		case "AuthMethod":
			r, ok := negotiateKey(&ls.params, &ls.policy, kv, ls.discovery)
			if ok && r.Value == valReject {
				return failWith(loginAuthFailure)
			}
			out = append(out, r)
			continue
		}
		if r, ok := negotiateKey(&ls.params, &ls.policy, kv, ls.discovery); ok {
			out = append(out, r)
		}
	}
	ls.params.finish()
	if !ls.declaredDSL && (csg == stageOperational || (transit && nsg == stageFullFeature)) {
		ls.declaredDSL = true
		out = append(out, textKV{"MaxRecvDataSegmentLength", strconv.FormatUint(uint64(ls.params.TargetRecvDSL), 10)})
	}

	if transit {
		resp[1] = flagTransit | csg<<2 | nsg
		ls.stage = nsg
		if nsg == stageFullFeature {
			tsih, st := ls.env.complete(ls)
			if st != 0 {
				return failWith(st)
			}
			ls.tsih = tsih
			binary.BigEndian.PutUint16(resp[14:16], tsih)
			ls.done = true
		}
	}
	ls.fillSN(&resp)
	return resp, appendTextKeys(nil, out), false
}

func (ls *loginState) fillSN(resp *bhs) {
	resp.setU32(offCmdSN, ls.statSN)
	ls.statSN++
	resp.setU32(offExpStatSN, ls.expCmdSN)
	resp.setU32(offMaxCmdSN, ls.expCmdSN+ls.depth-1)
}
