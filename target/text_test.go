package target

import (
	"reflect"
	"testing"
)

func TestParseTextKeys(t *testing.T) {
	kvs, rest, err := parseTextKeys([]byte("A=1\x00B=\x00C=x=y\x00\x00"), false)
	if err != nil || rest != nil {
		t.Fatal(err)
	}
	want := []textKV{{"A", "1"}, {"B", ""}, {"C", "x=y"}}
	if !reflect.DeepEqual(kvs, want) {
		t.Fatalf("got %v want %v", kvs, want)
	}
	if _, _, err := parseTextKeys([]byte("A=1"), false); err == nil {
		t.Fatal("unterminated pair accepted")
	}
	kvs, rest, err = parseTextKeys([]byte("A=1\x00Bxx=par"), true)
	if err != nil || len(kvs) != 1 || string(rest) != "Bxx=par" {
		t.Fatalf("partial: %v %q %v", kvs, rest, err)
	}
	for _, bad := range []string{"=v\x00", "novalue\x00"} {
		if _, _, err := parseTextKeys([]byte(bad), false); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	long := make([]byte, 70)
	for i := range long {
		long[i] = 'k'
	}
	if _, _, err := parseTextKeys(append(append(long, "=1"...), 0), false); err == nil {
		t.Error("64+ byte key accepted")
	}
}

func FuzzParseTextKeys(f *testing.F) {
	f.Add([]byte("InitiatorName=iqn.1993-08.org.debian:01:abc\x00SessionType=Normal\x00"), false)
	f.Add([]byte("HeaderDigest=CRC32C,None\x00MaxRecvDataSegmentLength=262144\x00X-com.example=1"), true)
	f.Add([]byte("SendTargets=All\x00"), false)
	f.Fuzz(func(t *testing.T, b []byte, partial bool) {
		kvs, rest, err := parseTextKeys(b, partial)
		if err != nil {
			return
		}
		// What parsed re-encodes into something that parses to the same pairs.
		again, _, err := parseTextKeys(appendTextKeys(nil, kvs), false)
		if err != nil || len(again) != len(kvs) {
			t.Fatalf("re-parse: %v (%d vs %d)", err, len(again), len(kvs))
		}
		if len(rest) > len(b) {
			t.Fatal("rest longer than input")
		}
		// Negotiation never panics on parsed input.
		p := defaultParams(8192)
		pol := DefaultPolicy()
		for _, kv := range kvs {
			negotiateKey(&p, &pol, kv, partial)
		}
	})
}
