package target

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"nstarget/target/chap"
)

const (
	testUser   = "iqn.i:x-user"
	testSecret = "correct horse battery"
	mutUser    = "target-user"
	mutSecret  = "staple and more staple"
)

func testCreds(mutual bool, algs ...chap.Algorithm) *chap.Credentials {
	c := &chap.Credentials{User: testUser, Secret: chap.NewSecret([]byte(testSecret)), Algorithms: algs}
	if mutual {
		c.MutualUser, c.MutualSecret = mutUser, chap.NewSecret([]byte(mutSecret))
	}
	return c
}

// chapEnv is a fake tenant with one target that requires creds (and one open target), and
// discovery CHAP disc.
func chapEnv(creds, disc *chap.Credentials, allow ...string) *fakeLoginEnv {
	env := newFakeEnv()
	tg := &Target{cfg: TargetConfig{IQN: "iqn.t:chap", CHAP: creds}}
	if len(allow) > 0 {
		tg.allow = map[string]bool{}
		for _, a := range allow {
			tg.allow[a] = true
		}
	}
	env.targets["iqn.t:chap"] = tg
	env.disc = disc
	return env
}

// chapRun is one login driven like an initiator does it, step by step.
type chapRun struct {
	t    *testing.T
	ls   *loginState
	alg  chap.Algorithm
	id   byte
	chal []byte
}

func newChapRun(t *testing.T, env *fakeLoginEnv) *chapRun {
	return &chapRun{t: t, ls: newLoginState(env, DefaultPolicy(), 128)}
}

func (r *chapRun) step(req *frame) (bhs, map[string]string, bool) {
	r.t.Helper()
	resp, data, fail := r.ls.step(req)
	if fail {
		return resp, nil, true
	}
	return resp, answers(r.t, data), false
}

// challenge runs the first two exchanges (AuthMethod, CHAP_A) and keeps the target's challenge.
func (r *chapRun) challenge(offerAlgs string, first ...string) {
	r.t.Helper()
	kvs := append([]string{"InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP,None"}, first...)
	resp, a, fail := r.step(loginReq(0, 1, false, false, kvs...))
	if fail || a["AuthMethod"] != "CHAP" {
		r.t.Fatalf("AuthMethod: fail=%v status %04x answers %v", fail, status(resp), a)
	}
	resp, a, fail = r.step(loginReq(0, 1, false, false, "CHAP_A="+offerAlgs))
	if fail {
		r.t.Fatalf("CHAP_A=%s: status %04x (%v)", offerAlgs, status(resp), r.ls.authFail)
	}
	n, _ := strconv.Atoi(a["CHAP_A"])
	id, _ := strconv.Atoi(a["CHAP_I"])
	c, err := chap.DecodeBinary(a["CHAP_C"])
	if err != nil || id < 0 || id > 255 {
		r.t.Fatalf("challenge answers %v: %v", a, err)
	}
	r.alg, r.id, r.chal = chap.Algorithm(n), byte(id), c
}

func (r *chapRun) response(secret string) string {
	return chap.EncodeHex(r.alg.Response(r.id, chap.NewSecret([]byte(secret)), r.chal))
}

// answer sends CHAP_N/CHAP_R (and more keys) with T=1 to the operational stage.
func (r *chapRun) answer(kvs ...string) (bhs, map[string]string, bool) {
	r.t.Helper()
	return r.step(loginReq(0, 1, true, false, kvs...))
}

func (r *chapRun) wantAuthFailure(resp bhs, fail bool, why string) {
	r.t.Helper()
	if !fail || status(resp) != loginAuthFailure {
		r.t.Fatalf("%s: fail=%v status %04x, want 0x0201", why, fail, status(resp))
	}
	if r.ls.authFail == nil {
		r.t.Fatalf("%s: refused without asking the edge for the failure delay", why)
	}
	if strings.Contains(r.ls.authFail.reason, testSecret) || strings.Contains(r.ls.authFail.reason, mutSecret) {
		r.t.Fatalf("%s: reason carries a secret", why)
	}
}

func TestCHAPOneWayLoginSucceedsWithEveryAlgorithm(t *testing.T) {
	for _, alg := range []chap.Algorithm{chap.MD5, chap.SHA1, chap.SHA256, chap.SHA3_256} {
		t.Run(alg.String(), func(t *testing.T) {
			env := chapEnv(testCreds(false), nil)
			r := newChapRun(t, env)
			r.challenge(strconv.Itoa(int(alg)))
			if r.alg != alg || len(r.chal) != alg.ChallengeLen() || len(r.chal) < 16 {
				t.Fatalf("chose %v with a %d-byte challenge", r.alg, len(r.chal))
			}
			resp, a, fail := r.answer("CHAP_N="+testUser, "CHAP_R="+r.response(testSecret))
			if fail || resp[1] != flagTransit|0<<2|1 {
				t.Fatalf("right response refused: status %04x flags %02x (%v)", status(resp), resp[1], r.ls.authFail)
			}
			if _, ok := a["CHAP_N"]; ok {
				t.Fatal("target authenticated itself although not asked to")
			}
			resp, _, fail = r.step(loginReq(1, 3, true, false, "HeaderDigest=None"))
			if fail || !r.ls.done || env.completed != 1 {
				t.Fatalf("operational stage after CHAP: status %04x", status(resp))
			}
		})
	}
}

func TestCHAPChoosesTheTargetsFirstPreferenceTheInitiatorOffers(t *testing.T) {
	cases := []struct {
		prefs []chap.Algorithm
		offer string
		want  chap.Algorithm
	}{
		{nil, "5,6,7,8", chap.SHA3_256},
		{nil, "5,7", chap.SHA256},
		{nil, "5", chap.MD5},
		{nil, "99,6,x,5", chap.SHA1},
		{[]chap.Algorithm{chap.SHA256, chap.MD5}, "8,5,7", chap.SHA256},
		{[]chap.Algorithm{chap.MD5, chap.SHA3_256}, "8,5", chap.MD5},
	}
	for _, tc := range cases {
		r := newChapRun(t, chapEnv(testCreds(false, tc.prefs...), nil))
		r.challenge(tc.offer)
		if r.alg != tc.want {
			t.Errorf("prefs %v offer %s: chose %v, want %v", tc.prefs, tc.offer, r.alg, tc.want)
		}
	}
}

func TestCHAPRefusesWhenNoAlgorithmIsInCommon(t *testing.T) {
	for _, offer := range []string{"5", "9,10", "", "MD5", "5;7"} {
		r := newChapRun(t, chapEnv(testCreds(false, chap.SHA256, chap.SHA3_256), nil))
		if _, _, fail := r.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP")); fail {
			t.Fatal("AuthMethod refused")
		}
		resp, _, fail := r.step(loginReq(0, 1, false, false, "CHAP_A="+offer))
		r.wantAuthFailure(resp, fail, "CHAP_A="+offer)
	}
}

func TestCHAPRefusesAWrongResponseOrUser(t *testing.T) {
	cases := map[string]func(r *chapRun) []string{
		"wrong secret": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + r.response("not the secret!!")}
		},
		"wrong user": func(r *chapRun) []string {
			return []string{"CHAP_N=someone-else", "CHAP_R=" + r.response(testSecret)}
		},
		"user differs in case": func(r *chapRun) []string {
			return []string{"CHAP_N=" + strings.ToUpper(testUser), "CHAP_R=" + r.response(testSecret)}
		},
		"response of another algorithm": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + chap.EncodeHex(chap.MD5.Response(r.id, chap.NewSecret([]byte(testSecret)), r.chal))}
		},
		"response to another identifier": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + chap.EncodeHex(r.alg.Response(r.id+1, chap.NewSecret([]byte(testSecret)), r.chal))}
		},
		"truncated response": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + r.response(testSecret)[:20]}
		},
		"empty response": func(r *chapRun) []string { return []string{"CHAP_N=" + testUser, "CHAP_R="} },
		"not hex":        func(r *chapRun) []string { return []string{"CHAP_N=" + testUser, "CHAP_R=0xZZ"} },
		"no prefix": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + r.response(testSecret)[2:]}
		},
		"missing CHAP_R": func(r *chapRun) []string { return []string{"CHAP_N=" + testUser} },
		"missing CHAP_N": func(r *chapRun) []string { return []string{"CHAP_R=" + r.response(testSecret)} },
		"CHAP_I without CHAP_C": func(r *chapRun) []string {
			return []string{"CHAP_N=" + testUser, "CHAP_R=" + r.response(testSecret), "CHAP_I=3"}
		},
		"no keys at all": func(r *chapRun) []string { return nil },
	}
	for name, keys := range cases {
		t.Run(name, func(t *testing.T) {
			r := newChapRun(t, chapEnv(testCreds(true), nil))
			r.challenge("7")
			resp, _, fail := r.answer(keys(r)...)
			r.wantAuthFailure(resp, fail, name)
		})
	}
}

func TestCHAPAcceptsHexAndBase64Encodings(t *testing.T) {
	enc := map[string]func([]byte) string{
		"0x lower": func(b []byte) string { return "0x" + hex.EncodeToString(b) },
		"0X upper": func(b []byte) string { return "0X" + strings.ToUpper(hex.EncodeToString(b)) },
		"0b":       func(b []byte) string { return "0b" + base64.StdEncoding.EncodeToString(b) },
		"0B":       func(b []byte) string { return "0B" + base64.StdEncoding.EncodeToString(b) },
		"0b unpadded": func(b []byte) string {
			return "0b" + base64.RawStdEncoding.EncodeToString(b)
		},
	}
	for name, e := range enc {
		t.Run(name, func(t *testing.T) {
			r := newChapRun(t, chapEnv(testCreds(true), nil))
			r.challenge("5")
			resp := r.alg.Response(r.id, chap.NewSecret([]byte(testSecret)), r.chal)
			ic := bytes.Repeat([]byte{0x5a}, 16)
			_, a, fail := r.answer("CHAP_N="+testUser, "CHAP_R="+e(resp), "CHAP_I=0x07", "CHAP_C="+e(ic))
			if fail {
				t.Fatalf("refused (%v)", r.ls.authFail)
			}
			want := chap.MD5.Response(7, chap.NewSecret([]byte(mutSecret)), ic)
			if got, _ := chap.DecodeBinary(a["CHAP_R"]); !bytes.Equal(got, want) || a["CHAP_N"] != mutUser {
				t.Fatalf("mutual answer %v", a)
			}
		})
	}
	if b, err := chap.DecodeBinary("0xabc"); err != nil || !bytes.Equal(b, []byte{0x0a, 0xbc}) {
		t.Fatalf("odd hex digits: %x %v", b, err)
	}
	for _, bad := range []string{"", "0x", "0b", "0y12", "12", "0b!!!!", "0x" + strings.Repeat("00", chap.MaxBinaryLen+1)} {
		if _, err := chap.DecodeBinary(bad); err == nil {
			t.Errorf("DecodeBinary(%.20q) accepted", bad)
		}
	}
}

func TestMutualCHAPTargetProvesItKnowsTheMutualSecret(t *testing.T) {
	for _, alg := range []chap.Algorithm{chap.MD5, chap.SHA256, chap.SHA3_256} {
		r := newChapRun(t, chapEnv(testCreds(true), nil))
		r.challenge(strconv.Itoa(int(alg)))
		ic := make([]byte, 32)
		for i := range ic {
			ic[i] = byte(i * 7)
		}
		_, a, fail := r.answer("CHAP_N="+testUser, "CHAP_R="+r.response(testSecret), "CHAP_I=200", "CHAP_C="+chap.EncodeHex(ic))
		if fail {
			t.Fatalf("%v: refused (%v)", alg, r.ls.authFail)
		}
		got, _ := chap.DecodeBinary(a["CHAP_R"])
		if a["CHAP_N"] != mutUser || !alg.Verify(200, chap.NewSecret([]byte(mutSecret)), ic, got) {
			t.Fatalf("%v: target's answer %v does not prove the mutual secret", alg, a)
		}
	}
}

func TestMutualCHAPRefusals(t *testing.T) {
	ok := func(r *chapRun) []string { return []string{"CHAP_N=" + testUser, "CHAP_R=" + r.response(testSecret)} }
	cases := []struct {
		name   string
		mutual bool
		extra  func(r *chapRun) []string
	}{
		{"mutual asked, none configured", false, func(r *chapRun) []string {
			return []string{"CHAP_I=1", "CHAP_C=" + chap.EncodeHex(bytes.Repeat([]byte{1}, 16))}
		}},
		{"challenge too short", true, func(r *chapRun) []string {
			return []string{"CHAP_I=1", "CHAP_C=" + chap.EncodeHex(bytes.Repeat([]byte{1}, minInitiatorChallenge-1))}
		}},
		{"challenge too long", true, func(r *chapRun) []string {
			return []string{"CHAP_I=1", "CHAP_C=" + chap.EncodeHex(bytes.Repeat([]byte{1}, chap.MaxBinaryLen+1))}
		}},
		{"identifier out of range", true, func(r *chapRun) []string {
			return []string{"CHAP_I=256", "CHAP_C=" + chap.EncodeHex(bytes.Repeat([]byte{1}, 16))}
		}},
		{"reflected: the target's own challenge", true, func(r *chapRun) []string {
			return []string{"CHAP_I=" + strconv.Itoa(int(r.id)), "CHAP_C=" + chap.EncodeHex(r.chal)}
		}},
		{"reflected in base64", true, func(r *chapRun) []string {
			return []string{"CHAP_I=9", "CHAP_C=0b" + base64.StdEncoding.EncodeToString(r.chal)}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newChapRun(t, chapEnv(testCreds(tc.mutual), nil))
			r.challenge("7")
			resp, _, fail := r.answer(append(ok(r), tc.extra(r)...)...)
			r.wantAuthFailure(resp, fail, tc.name)
		})
	}
}

// The reflection attack proper: a second connection presents, as its mutual challenge, the
// challenge the target just issued on the first one, hoping the target answers it.
func TestMutualCHAPRefusesAChallengeIssuedOnAnotherConnection(t *testing.T) {
	env := chapEnv(testCreds(true), nil)
	victim := newChapRun(t, env)
	victim.challenge("5")
	attacker := newChapRun(t, env)
	attacker.challenge("5")
	resp, _, fail := attacker.answer("CHAP_N="+testUser, "CHAP_R="+attacker.response(testSecret),
		"CHAP_I="+strconv.Itoa(int(victim.id)), "CHAP_C="+chap.EncodeHex(victim.chal))
	attacker.wantAuthFailure(resp, fail, "challenge of another connection")
}

func TestCHAPNeverIssuesTheSameChallengeTwice(t *testing.T) {
	env := chapEnv(testCreds(false), nil)
	seen := map[string]bool{}
	for range 200 {
		r := newChapRun(t, env)
		r.challenge("5")
		if seen[string(r.chal)] {
			t.Fatal("challenge issued twice")
		}
		seen[string(r.chal)] = true
	}
	l := newChallengeLog()
	if !l.add([]byte("a")) || l.add([]byte("a")) {
		t.Fatal("challenge log accepted a duplicate")
	}
	for i := range challengeMemory {
		l.add([]byte(fmt.Sprint(i)))
	}
	if l.has([]byte("a")) || !l.has([]byte(fmt.Sprint(challengeMemory-1))) || len(l.set) != challengeMemory {
		t.Fatal("challenge log does not forget the oldest")
	}
}

func TestCHAPRequiredRefusesInitiatorsThatAvoidIt(t *testing.T) {
	cases := []struct {
		name string
		reqs []*frame
	}{
		{"offers only None", []*frame{loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=None")}},
		{"skips the security stage", []*frame{loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap")}},
		{"leaves the security stage without AuthMethod", []*frame{loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap")}},
		{"leaves after AuthMethod, before CHAP_A", []*frame{
			loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"),
			loginReq(0, 1, true, false)}},
		{"leaves after the challenge without answering", []*frame{
			loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"),
			loginReq(0, 1, false, false, "CHAP_A=5"),
			loginReq(0, 1, true, false)}},
		{"answers in the request that asks for the challenge", []*frame{
			loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"),
			loginReq(0, 1, true, false, "CHAP_A=5", "CHAP_N="+testUser, "CHAP_R=0x00")}},
		{"CHAP_A before AuthMethod", []*frame{loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "CHAP_A=5")}},
		{"AuthMethod twice", []*frame{
			loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"),
			loginReq(0, 1, false, false, "AuthMethod=CHAP")}},
		{"answers before being challenged", []*frame{
			loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP", "CHAP_N="+testUser, "CHAP_R=0x00")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newChapRun(t, chapEnv(testCreds(false), nil))
			var resp bhs
			var fail bool
			for i, req := range tc.reqs {
				resp, _, fail = r.step(req)
				if fail && i < len(tc.reqs)-1 {
					t.Fatalf("request %d refused early: %04x", i, status(resp))
				}
			}
			r.wantAuthFailure(resp, fail, tc.name)
		})
	}
}

func TestCHAPTransitRequestIsHeldUntilTheChallengeIsAnswered(t *testing.T) {
	r := newChapRun(t, chapEnv(testCreds(false), nil))
	if _, a, fail := r.step(loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP", "CHAP_A=7")); fail || a["CHAP_C"] == "" {
		t.Fatalf("AuthMethod+CHAP_A with T=1: fail=%v answers %v", fail, a)
	}
	if r.ls.stage != stageSecurity {
		t.Fatal("target left the security stage before the initiator answered its challenge")
	}
}

func TestCHAPAndAllowListMustBothPass(t *testing.T) {
	// Not on the list: refused before any CHAP, whatever the secret.
	r := newChapRun(t, chapEnv(testCreds(false), nil, "iqn.i:other"))
	resp, _, fail := r.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"))
	if !fail || status(resp) != loginAuthorizationFail {
		t.Fatalf("initiator not on the allow-list: status %04x", status(resp))
	}
	// On the list, wrong secret: refused.
	r = newChapRun(t, chapEnv(testCreds(false), nil, "iqn.i:x"))
	r.challenge("5")
	resp, _, fail = r.answer("CHAP_N="+testUser, "CHAP_R="+r.response("the wrong secret"))
	r.wantAuthFailure(resp, fail, "allowed initiator with a wrong secret")
	// On the list, right secret: in.
	r = newChapRun(t, chapEnv(testCreds(false), nil, "iqn.i:x"))
	r.challenge("5")
	if _, _, fail = r.answer("CHAP_N="+testUser, "CHAP_R="+r.response(testSecret)); fail {
		t.Fatalf("allowed initiator with the right secret refused (%v)", r.ls.authFail)
	}
}

func TestDiscoveryCHAPIsTheTenantsOwn(t *testing.T) {
	disc := &chap.Credentials{User: "disc-user", Secret: chap.NewSecret([]byte("discovery secret"))}
	// Required: None is refused.
	ls := newLoginState(chapEnv(nil, disc), DefaultPolicy(), 128)
	resp, _, fail := ls.step(loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "SessionType=Discovery", "AuthMethod=None"))
	if !fail || status(resp) != loginAuthFailure {
		t.Fatalf("discovery without CHAP: status %04x", status(resp))
	}
	// The target's secret does not open discovery; the discovery secret does.
	for _, tc := range []struct {
		user, secret string
		ok           bool
	}{{testUser, testSecret, false}, {"disc-user", "discovery secret", true}} {
		r := newChapRun(t, chapEnv(testCreds(false), disc))
		if _, a, fail := r.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "SessionType=Discovery", "AuthMethod=CHAP")); fail || a["AuthMethod"] != "CHAP" {
			t.Fatal("discovery AuthMethod")
		}
		_, a, _ := r.step(loginReq(0, 1, false, false, "CHAP_A=5"))
		id, _ := strconv.Atoi(a["CHAP_I"])
		c, _ := chap.DecodeBinary(a["CHAP_C"])
		rsp := chap.EncodeHex(chap.MD5.Response(byte(id), chap.NewSecret([]byte(tc.secret)), c))
		_, _, fail := r.answer("CHAP_N="+tc.user, "CHAP_R="+rsp)
		if fail == tc.ok {
			t.Errorf("discovery as %s: fail=%v", tc.user, fail)
		}
	}
	// Without discovery CHAP, discovery stays open even when targets require CHAP.
	ls = newLoginState(chapEnv(testCreds(false), nil), DefaultPolicy(), 128)
	if resp, _, fail := ls.step(loginReq(0, 1, true, false, "InitiatorName=iqn.i:x", "SessionType=Discovery", "AuthMethod=None")); fail {
		t.Fatalf("open discovery refused: %04x", status(resp))
	}
}

func TestCHAPKeysOutsideTheSecurityStageAreAProtocolError(t *testing.T) {
	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	resp, _, fail := ls.step(loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "CHAP_A=5"))
	if !fail || status(resp) != loginInitiatorError {
		t.Fatalf("CHAP_A in the operational stage: status %04x", status(resp))
	}
}

func TestSecretsNeverPrint(t *testing.T) {
	creds := testCreds(true)
	env := chapEnv(creds, creds)
	r := newChapRun(t, env)
	r.challenge("5")
	type holder struct{ s chap.Secret } // unexported field: fmt prints it by reflection
	var sb strings.Builder
	lg := slog.New(slog.NewTextHandler(&sb, nil))
	lg.Info("x", "creds", creds, "secret", creds.Secret, "mutual", creds.MutualSecret)
	slog.New(slog.NewJSONHandler(&sb, nil)).Info("x", "creds", creds, "secret", creds.Secret)
	outs := []string{sb.String()}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
		outs = append(outs, fmt.Sprintf(verb, creds.Secret), fmt.Sprintf(verb, *creds), fmt.Sprintf(verb, creds),
			fmt.Sprintf(verb, holder{creds.Secret}), fmt.Sprintf(verb, *r.ls), fmt.Sprintf(verb, env.targets["iqn.t:chap"].cfg))
	}
	secretHex := hex.EncodeToString([]byte(testSecret))
	for _, o := range outs {
		for _, s := range []string{testSecret, mutSecret, secretHex, fmt.Sprint([]byte(testSecret)), fmt.Sprintf("%x", testSecret)} {
			if strings.Contains(o, s) || strings.Contains(strings.ToLower(o), strings.ToLower(s)) {
				t.Fatalf("secret printed: %.200s", o)
			}
		}
	}
	if !strings.Contains(fmt.Sprint(creds.Secret), "redacted") {
		t.Fatal("a secret does not say it is redacted")
	}
}

func TestChallengeWireFormatIsHex(t *testing.T) {
	r := newChapRun(t, chapEnv(testCreds(false), nil))
	_, _, _ = r.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=CHAP"))
	_, data, _ := r.ls.step(loginReq(0, 1, false, false, "CHAP_A=8"))
	if !bytes.Contains(data, []byte("CHAP_A=8\x00CHAP_I=")) || !bytes.Contains(data, []byte("CHAP_C=0x")) {
		t.Fatalf("challenge on the wire: %q", data)
	}
	_ = binary.BigEndian
}

func TestCHAPChangedLiveAppliesToTheNextLogin(t *testing.T) {
	env := chapEnv(testCreds(false), nil)
	tg := env.targets["iqn.t:chap"]
	var s Server
	rotated := &chap.Credentials{User: testUser, Secret: chap.NewSecret([]byte("a brand new secret"))}
	s.SetCHAP(tg, rotated)
	r := newChapRun(t, env)
	r.challenge("5")
	resp, _, fail := r.answer("CHAP_N="+testUser, "CHAP_R="+r.response(testSecret))
	r.wantAuthFailure(resp, fail, "the secret in force before the change")
	r = newChapRun(t, env)
	r.challenge("5")
	if resp, _, fail := r.answer("CHAP_N="+testUser, "CHAP_R="+r.response("a brand new secret")); fail {
		t.Fatalf("the new secret was refused: status %04x", status(resp))
	}
	// CHAP removed: the target is open again.
	s.SetCHAP(tg, nil)
	r = newChapRun(t, env)
	resp, a, fail := r.step(loginReq(0, 1, false, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:chap", "AuthMethod=None"))
	if fail || a["AuthMethod"] != "None" {
		t.Fatalf("after CHAP was removed: status %04x answers %v", status(resp), a)
	}
}
