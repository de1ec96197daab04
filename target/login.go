package target

import (
	"encoding/binary"
	"strconv"

	"nstarget/target/chap"
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
	loginTargetRemoved      = 0x0204
	loginTargetError        = 0x0300
	loginServiceUnavailable = 0x0301
	loginOutOfResources     = 0x0302
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
	// discoveryCHAP is what discovery sessions of this tenant must prove (nil: nothing).
	discoveryCHAP() *chap.Credentials
	// challenge returns a fresh random CHAP identifier and challenge of n bytes, never one
	// issued recently, and remembers it for issued.
	challenge(n int) (id byte, c []byte)
	// issued reports whether c is a challenge the server issued recently (on any connection).
	issued(c []byte) bool
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
	creds         *chap.Credentials // what the initiator must prove; nil: AuthMethod=None
	auth          authState
	chapAlg       chap.Algorithm
	chapID        byte
	chapC         []byte
	// authFail is set when the login is refused for failed authentication: the edge logs it
	// and answers only after authFailDelay.
	authFail *authFailure
	partial  []byte // text of requests with the C bit set
	// A response longer than the initiator may receive goes out in parts (C bit); the rest
	// waits here for the initiator's empty request, and the last part carries the
	// transition (final) that the whole response decided.
	pendingText []byte
	final       bhs
	finalDone   bool
	done        bool
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
	copy(resp[offISID:offISID+6], h[offISID:offISID+6])
	resp.setU32(offITT, h.itt())
	cmdSN := h.u32(offCmdSN)

	failWith := func(status uint16) (bhs, []byte, bool) {
		resp[1] = csg << 2
		binary.BigEndian.PutUint16(resp[offLoginStatus:], status)
		ls.fillSN(&resp)
		return resp, nil, true
	}

	if h.opcode() != opLoginReq {
		return failWith(loginInvalidDuringLogin)
	}
	if h[offVersionMin] > 0 || h[offVersionMax] < h[offVersionMin] { // we speak version 0 only
		return failWith(loginUnsupportedVersion)
	}
	if !ls.started {
		ls.started = true
		copy(ls.isid[:], h[offISID:offISID+6])
		ls.tsih = binary.BigEndian.Uint16(h[offTSIH:])
		ls.cid = binary.BigEndian.Uint16(h[offCID:])
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
		if [6]byte(h[offISID:offISID+6]) != ls.isid || binary.BigEndian.Uint16(h[offTSIH:]) != ls.tsih {
			return failWith(loginInitiatorError)
		}
	}
	if ls.pendingText != nil {
		// The initiator collects the rest of a long response with empty requests.
		if cont || len(req.Data) > 0 {
			return failWith(loginInitiatorError)
		}
		return ls.nextPart()
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
			ls.creds = ls.env.discoveryCHAP()
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
			ls.creds = tg.credentials()
		}
	} else if sessionType != "" && (sessionType == "Discovery") != ls.discovery {
		return failWith(loginInitiatorError)
	}

	if ls.creds != nil && ls.auth != authDone && csg != stageSecurity {
		ls.authFail = &authFailure{reason: "CHAP required; the initiator skipped the security stage"}
		return failWith(loginAuthFailure)
	}

	var out []textKV
	if first && !ls.discovery {
		out = append(out, textKV{"TargetPortalGroupTag", tpgtString})
		if ls.target != nil && ls.target.cfg.Alias != "" {
			out = append(out, textKV{"TargetAlias", ls.target.cfg.Alias})
		}
	}
	if csg == stageSecurity {
		auth, st, progressed := ls.security(kvs)
		if st != 0 {
			return failWith(st)
		}
		out = append(out, auth...)
		if transit && ls.creds != nil && ls.auth != authDone {
			if !progressed {
				ls.authFail = &authFailure{reason: "the initiator left the security stage before authenticating", algorithm: ls.chapAlg}
				return failWith(loginAuthFailure)
			}
			// The initiator may ask to move on at once; it has to finish CHAP first (RFC
			// 7143 §6.2: the target answers T=0 to stay in the stage).
			transit = false
		}
	}
	for _, kv := range kvs {
		switch kv.Key {
		case "InitiatorName", "InitiatorAlias", "SessionType", "TargetName":
			continue
		}
		if isAuthKey(kv.Key) {
			if csg != stageSecurity {
				// Security keys belong to the security stage (RFC 7143 §6.3).
				return failWith(loginInitiatorError)
			}
			continue
		}
		r, ok := negotiateKey(&ls.params, &ls.policy, kv, ls.discovery)
		if ok && kv.Key == "MaxRecvDataSegmentLength" && r.Value == valReject {
			// A declaration outside 512..2^24-1 cannot be rejected and declared back under
			// the same key in one answer; there is no value the session could run with.
			return failWith(loginInitiatorError)
		}
		if ok {
			out = append(out, r)
		}
	}
	ls.params.finish()
	for i := range out {
		// The burst lengths may arrive in either order; the answer must never let the
		// first burst exceed the whole burst (RFC 7143 §13.14), or immediate data the
		// initiator was allowed to send would exceed what the session accepts.
		if out[i].Key == "FirstBurstLength" && out[i].Value != valIrrelevant && out[i].Value != valReject {
			out[i].Value = strconv.FormatUint(uint64(ls.params.FirstBurstLength), 10)
		}
	}
	if !ls.declaredDSL && (csg == stageOperational || (transit && nsg == stageFullFeature)) {
		ls.declaredDSL = true
		out = append(out, textKV{"MaxRecvDataSegmentLength", strconv.FormatUint(uint64(ls.params.TargetRecvDSL), 10)})
	}
	out = uniqueKeys(out)

	if transit {
		resp[1] = flagTransit | csg<<2 | nsg
		ls.stage = nsg
		if nsg == stageFullFeature {
			tsih, st := ls.env.complete(ls)
			if st != 0 {
				return failWith(st)
			}
			ls.tsih = tsih
			binary.BigEndian.PutUint16(resp[offTSIH:], tsih)
			ls.done = true
		}
	}
	ans := appendTextKeys(nil, out)
	if len(ans) > loginResponseLimit {
		ls.final, ls.finalDone = resp, ls.done
		// Until the last part the initiator does not know its TSIH and keeps sending 0.
		ls.done, ls.tsih = false, 0
		ls.pendingText = ans
		return ls.nextPart()
	}
	ls.fillSN(&resp)
	return resp, ans, false
}

// loginResponseLimit bounds one login response's data: the initiator's
// MaxRecvDataSegmentLength applies from the full feature phase, and until then 8192 bytes
// (its default) is what every initiator can take (RFC 7143 §13.12).
const loginResponseLimit = 8192

// nextPart sends the next part of a long response: C and no T until the last part, which
// carries the response's own flags and TSIH.
func (ls *loginState) nextPart() (bhs, []byte, bool) {
	resp := ls.final
	part := ls.pendingText
	if len(part) > loginResponseLimit {
		part = part[:loginResponseLimit]
		ls.pendingText = ls.pendingText[loginResponseLimit:]
		resp[1] = resp[1]&(3<<2) | flagContinue // CSG kept, no T, no NSG
		binary.BigEndian.PutUint16(resp[offTSIH:], 0)
	} else {
		ls.pendingText = nil
		ls.done = ls.finalDone
		ls.tsih = binary.BigEndian.Uint16(resp[offTSIH:])
	}
	ls.fillSN(&resp)
	return resp, part, false
}

// uniqueKeys drops later answers to a key already answered: a response never carries a key
// twice (RFC 7143 §6.6). Our own declarations come first and win, e.g. TargetAlias over the
// Reject of an initiator that sent TargetAlias itself.
func uniqueKeys(out []textKV) []textKV {
	if len(out) < 2 {
		return out
	}
	seen := make(map[string]bool, len(out))
	kept := out[:0]
	for _, kv := range out {
		if !seen[kv.Key] {
			seen[kv.Key] = true
			kept = append(kept, kv)
		}
	}
	return kept
}

func (ls *loginState) fillSN(resp *bhs) {
	resp.setU32(offCmdSN, ls.statSN)
	ls.statSN++
	resp.setU32(offExpStatSN, ls.expCmdSN)
	resp.setU32(offMaxCmdSN, ls.expCmdSN+ls.depth-1)
}
