package target

import (
	"strconv"
	"testing"
)

func TestLoginResponseNeverRepeatsAKey(t *testing.T) {
	cases := [][]string{
		// Target-only keys from the initiator are rejected, but the target declares them too.
		{"InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "TargetAlias=mine", "TargetPortalGroupTag=7", "MaxBurstLength=4096", "FirstBurstLength=65536"},
		{"InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "MaxRecvDataSegmentLength=8192", "TargetAddress=1.2.3.4"},
	}
	for _, kvs := range cases {
		ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
		resp, data, fail := ls.step(loginReq(1, 3, true, false, kvs...))
		if fail {
			t.Fatalf("%v: status %04x", kvs, status(resp))
		}
		parsed, _, err := parseTextKeys(data, false)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]string{}
		for _, kv := range parsed {
			if v, dup := seen[kv.Key]; dup {
				t.Fatalf("%s answered twice (%q, %q) in %q", kv.Key, v, kv.Value, data)
			}
			seen[kv.Key] = kv.Value
		}
		if a, ok := seen["TargetAlias"]; ok && a != "disk" {
			t.Fatalf("TargetAlias answered %q, want our declaration", a)
		}
		if fb, mb := seen["FirstBurstLength"], seen["MaxBurstLength"]; fb != "" && mb != "" {
			f, _ := strconv.Atoi(fb)
			m, _ := strconv.Atoi(mb)
			if f > m {
				t.Fatalf("FirstBurstLength %d > MaxBurstLength %d", f, m)
			}
		}
	}
}

func TestFirstBurstAnswerFollowsAMaxBurstOfferedAfterIt(t *testing.T) {
	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	_, data, fail := ls.step(loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open",
		"FirstBurstLength=262144", "MaxBurstLength=8192"))
	a := answers(t, data)
	if fail || a["FirstBurstLength"] != "8192" || ls.params.FirstBurstLength != 8192 {
		t.Fatalf("answers %v params %d", a, ls.params.FirstBurstLength)
	}
}

func TestMaxRecvDataSegmentLengthOutOfRangeRefusesTheLogin(t *testing.T) {
	for _, v := range []string{"0", "511", "16777216", "x"} {
		for _, csg := range []byte{0, 1} {
			ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
			kvs := []string{"InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "MaxRecvDataSegmentLength=" + v}
			if csg == 0 {
				kvs = append(kvs, "AuthMethod=None")
			}
			resp, _, fail := ls.step(loginReq(csg, 1+2*csg, true, false, kvs...))
			if !fail || status(resp) != loginInitiatorError {
				t.Fatalf("MaxRecvDataSegmentLength=%s in stage %d: fail=%v status %04x", v, csg, fail, status(resp))
			}
		}
	}
	ls := newLoginState(newFakeEnv(), DefaultPolicy(), 128)
	_, _, fail := ls.step(loginReq(1, 3, true, false, "InitiatorName=iqn.i:x", "TargetName=iqn.t:open", "MaxRecvDataSegmentLength=512"))
	if fail || ls.params.InitiatorRecvDSL != 512 {
		t.Fatalf("the smallest legal value refused: %v %d", fail, ls.params.InitiatorRecvDSL)
	}
}

// A tenant must not learn from its TSIHs how many sessions other tenants opened.
func TestTSIHsAreUniqueAndNotASharedSequence(t *testing.T) {
	ts := startRAMServer(t, Options{})
	var tsihs []uint16
	seen := map[uint16]bool{}
	for i := range 40 {
		ini := dialTest(t, ts)
		f := ini.login("iqn.i:tsih", byte(i+1))
		v := uint16(f.BHS[offTSIH])<<8 | uint16(f.BHS[offTSIH+1])
		if v == 0 || seen[v] {
			t.Fatalf("TSIH %d zero or reused among live sessions", v)
		}
		seen[v] = true
		tsihs = append(tsihs, v)
	}
	ascending := 0
	for i := 1; i < len(tsihs); i++ {
		if tsihs[i] == tsihs[i-1]+1 {
			ascending++
		}
	}
	// Random TSIHs from 65535 values follow each other by chance about once in 65535.
	if ascending > 3 {
		t.Fatalf("TSIHs look sequential: %v", tsihs)
	}
}
