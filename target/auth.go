package target

import (
	"bytes"
	"crypto/subtle"
	"strconv"
	"strings"
	"sync"

	"nstarget/target/chap"
)

// authState is where the security stage of one login stands.
type authState uint8

const (
	authStart      authState = iota // no AuthMethod negotiated yet
	authChosen                      // AuthMethod=CHAP answered, waiting for CHAP_A
	authChallenged                  // CHAP_A/I/C sent, waiting for CHAP_N/R
	authDone                        // authenticated, or no authentication required
)

// minInitiatorChallenge is the shortest challenge an initiator may send for mutual CHAP: a
// short one makes the target's response easier to replay or to attack offline, and it is the
// MD5 digest size every initiator we know uses as its minimum.
const minInitiatorChallenge = 16

// isAuthKey reports the keys the security stage handles itself.
func isAuthKey(k string) bool {
	switch k {
	case "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R":
		return true
	}
	return false
}

// authFailure records why authentication failed; the edge logs it and answers 0x0201 after
// a constant delay, so a failure's timing says nothing about which check failed.
type authFailure struct {
	reason    string
	algorithm chap.Algorithm
}

// security runs the security stage's keys of one request. It returns the answers and, on
// refusal, a login status (and records ls.authFail when the status is an authentication
// failure). progressed reports that this response moved the exchange on (chose CHAP or issued
// the challenge): the initiator may have asked to leave the stage already (libiscsi sends
// T=1 from its first request), and has to answer first.
func (ls *loginState) security(kvs []textKV) (out []textKV, status uint16, progressed bool) {
	before := ls.auth
	out, status = ls.securityKeys(kvs)
	return out, status, status == 0 && ls.auth != before && ls.auth != authDone
}

func (ls *loginState) securityKeys(kvs []textKV) (out []textKV, status uint16) {
	get := map[string]string{}
	for _, kv := range kvs {
		if isAuthKey(kv.Key) {
			get[kv.Key] = kv.Value
		}
	}
	fail := func(reason string) ([]textKV, uint16) {
		ls.authFail = &authFailure{reason: reason, algorithm: ls.chapAlg}
		return nil, loginAuthFailure
	}
	challengedNow := false
	if v, ok := get["AuthMethod"]; ok {
		if ls.auth != authStart {
			return fail("AuthMethod offered twice")
		}
		if ls.creds == nil {
			r, _ := negotiateKey(&ls.params, &ls.policy, textKV{"AuthMethod", v}, ls.discovery)
			if r.Value != "None" {
				return fail("the initiator offers no AuthMethod=None and the target has no CHAP credentials")
			}
			ls.auth = authDone
			out = append(out, r)
		} else {
			if !listHas(v, "CHAP") {
				return fail("CHAP required; the initiator offered AuthMethod=" + quoteShort(v))
			}
			ls.auth = authChosen
			out = append(out, textKV{"AuthMethod", "CHAP"})
		}
	}
	if v, ok := get["CHAP_A"]; ok {
		if ls.auth != authChosen {
			return fail("CHAP_A out of order")
		}
		var offered []chap.Algorithm
		for _, s := range strings.Split(v, ",") {
			if n, ok := parseNum(s, 0, 255); ok {
				offered = append(offered, chap.Algorithm(n))
			}
		}
		alg, ok := ls.creds.Choose(offered)
		if !ok {
			return fail("no CHAP algorithm in common: initiator offered CHAP_A=" + quoteShort(v))
		}
		ls.chapAlg = alg
		ls.chapID, ls.chapC = ls.env.challenge(alg.ChallengeLen())
		ls.auth = authChallenged
		challengedNow = true
		out = append(out,
			textKV{"CHAP_A", strconv.Itoa(int(alg))},
			textKV{"CHAP_I", strconv.Itoa(int(ls.chapID))},
			textKV{"CHAP_C", chap.EncodeHex(ls.chapC)})
	}
	n, hasN := get["CHAP_N"]
	r, hasR := get["CHAP_R"]
	ii, hasI := get["CHAP_I"]
	ic, hasC := get["CHAP_C"]
	if !hasN && !hasR && !hasI && !hasC {
		return out, 0
	}
	if ls.auth != authChallenged || challengedNow {
		return fail("CHAP_N/CHAP_R/CHAP_I/CHAP_C before the target's challenge")
	}
	if !hasN || !hasR {
		return fail("CHAP_N or CHAP_R missing")
	}
	if hasI != hasC {
		return fail("CHAP_I and CHAP_C must come together")
	}
	resp, err := chap.DecodeBinary(r)
	// Both checks always run, so the time taken does not tell a wrong name from a wrong
	// response.
	nameOK := subtle.ConstantTimeCompare([]byte(n), []byte(ls.creds.User)) == 1
	respOK := err == nil && ls.chapAlg.Verify(ls.chapID, ls.creds.Secret, ls.chapC, resp)
	// A challenge is good for one answer only.
	own := ls.chapC
	ls.chapC = nil
	switch {
	case err != nil:
		return fail("CHAP_R: " + err.Error())
	case !nameOK:
		return fail("unknown CHAP user " + quoteShort(n))
	case !respOK:
		return fail("wrong CHAP response for user " + quoteShort(n))
	}
	if hasI {
		if !ls.creds.Mutual() {
			return fail("the initiator asks the target to authenticate (mutual CHAP); none is configured")
		}
		id, ok := parseNum(ii, 0, 255)
		if !ok {
			return fail("CHAP_I out of range")
		}
		c, err := chap.DecodeBinary(ic)
		if err != nil {
			return fail("CHAP_C: " + err.Error())
		}
		if len(c) < minInitiatorChallenge {
			return fail("initiator's CHAP_C shorter than " + strconv.Itoa(minInitiatorChallenge) + " bytes")
		}
		if bytes.Equal(c, own) || ls.env.issued(c) {
			// The reflection attack: the initiator hopes to get the answer to a challenge
			// this target (on this or another connection) asked someone to answer.
			return fail("initiator's CHAP_C is a challenge this target issued (reflection)")
		}
		out = append(out,
			textKV{"CHAP_N", ls.creds.MutualUser},
			textKV{"CHAP_R", chap.EncodeHex(ls.chapAlg.Response(byte(id), ls.creds.MutualSecret, c))})
	}
	ls.auth = authDone
	return out, 0
}

// quoteShort quotes what an initiator sent for a log line, cut to a length that keeps one
// hostile login from writing kilobytes into the log.
func quoteShort(s string) string {
	const limit = 64
	if len(s) > limit {
		return strconv.Quote(s[:limit]) + "…"
	}
	return strconv.Quote(s)
}

func listHas(list, v string) bool {
	for _, s := range strings.Split(list, ",") {
		if s == v {
			return true
		}
	}
	return false
}

// challengeLog remembers the challenges issued recently by the whole server, so that no
// initiator can have one of them answered by the target as its own mutual challenge.
type challengeLog struct {
	mu   sync.Mutex
	ring [][]byte
	next int
	set  map[string]struct{}
}

// challengeMemory is how many recent challenges are remembered: far more than can be
// outstanding, since a login that does not answer within loginTimeout is closed.
const challengeMemory = 4096

func newChallengeLog() *challengeLog {
	return &challengeLog{ring: make([][]byte, challengeMemory), set: make(map[string]struct{}, challengeMemory)}
}

// add records c and reports whether it was new.
func (l *challengeLog) add(c []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, dup := l.set[string(c)]; dup {
		return false
	}
	if old := l.ring[l.next]; old != nil {
		delete(l.set, string(old))
	}
	l.ring[l.next] = bytes.Clone(c)
	l.next = (l.next + 1) % len(l.ring)
	l.set[string(c)] = struct{}{}
	return true
}

func (l *challengeLog) has(c []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.set[string(c)]
	return ok
}
