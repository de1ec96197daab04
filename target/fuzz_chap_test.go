package target

import (
	"bytes"
	"testing"
)

// FuzzCHAPLogin feeds a login that requires CHAP arbitrary sequences of requests (text split
// at NULs into requests, flags from the fuzzer): the machine must never panic, and it must
// never finish a login to a target (or discovery) that requires CHAP, or leave the security
// stage, before the exchange is done. The challenge is random, so the fuzzer cannot answer it:
// reaching authDone at all is a bypass.
func FuzzCHAPLogin(f *testing.F) {
	f.Add([]byte{0x81, 0x81, 0x87}, []byte("InitiatorName=iqn.i:x\x00TargetName=iqn.t:chap\x00AuthMethod=CHAP,None\x00\x01CHAP_A=5,7\x00\x01CHAP_N=iqn.i:x-user\x00CHAP_R=0x00\x00"))
	f.Add([]byte{0x87, 0x07}, []byte("InitiatorName=iqn.i:x\x00TargetName=iqn.t:chap\x00AuthMethod=None\x00\x01HeaderDigest=None\x00"))
	f.Add([]byte{0x83}, []byte("InitiatorName=iqn.i:x\x00SessionType=Discovery\x00AuthMethod=CHAP\x00CHAP_A=8\x00"))
	f.Fuzz(func(t *testing.T, flags []byte, text []byte) {
		env := chapEnv(testCreds(true), testCreds(false))
		ls := newLoginState(env, DefaultPolicy(), 128)
		parts := bytes.Split(text, []byte{1})
		for i, part := range parts {
			if i >= 16 {
				break
			}
			fl := byte(0x81)
			if i < len(flags) {
				fl = flags[i]
			}
			req := loginReq(0, 0, false, false)
			req.BHS[1] = fl
			req.Data = part
			_, _, fail := ls.step(req)
			if fail {
				if ls.done {
					t.Fatal("a refused login is done")
				}
				return
			}
			if ls.creds != nil && ls.auth == authDone {
				t.Fatal("authenticated without knowing the challenge")
			}
			// (A login to the open target legitimately needs no CHAP.)
			if ls.creds != nil && ls.auth != authDone && (ls.done || ls.stage != stageSecurity) {
				t.Fatalf("left the security stage (stage %d, done %v) without authenticating", ls.stage, ls.done)
			}
		}
	})
}
