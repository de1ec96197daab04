package target

import (
	"sync/atomic"
	"testing"
)

func TestNegotiationTable(t *testing.T) {
	pol := DefaultPolicy()
	cases := []struct {
		key, offer string
		discovery  bool
		want       string // "" = no answer
		check      func(p params) bool
	}{
		{"HeaderDigest", "CRC32C,None", false, "CRC32C", func(p params) bool { return p.HeaderDigest }},
		{"HeaderDigest", "None,CRC32C", false, "None", func(p params) bool { return !p.HeaderDigest }},
		{"DataDigest", "MD5", false, "Reject", nil},
		{"MaxConnections", "8", false, "1", func(p params) bool { return p.MaxConnections == 1 }},
		{"MaxConnections", "0", false, "Reject", nil},
		{"InitialR2T", "No", false, "No", func(p params) bool { return !p.InitialR2T }},
		{"InitialR2T", "Yes", false, "Yes", func(p params) bool { return p.InitialR2T }},
		{"InitialR2T", "Maybe", false, "Reject", nil},
		{"ImmediateData", "Yes", false, "Yes", func(p params) bool { return p.ImmediateData }},
		{"ImmediateData", "No", false, "No", func(p params) bool { return !p.ImmediateData }},
		{"MaxRecvDataSegmentLength", "65536", false, "", func(p params) bool { return p.InitiatorRecvDSL == 65536 }},
		{"MaxRecvDataSegmentLength", "100", false, "Reject", nil},
		{"MaxBurstLength", "16776192", false, "1048576", func(p params) bool { return p.MaxBurstLength == 1<<20 }},
		{"MaxBurstLength", "0x10000", false, "65536", func(p params) bool { return p.MaxBurstLength == 65536 }},
		{"FirstBurstLength", "65536", false, "65536", nil},
		{"DefaultTime2Wait", "0", false, "2", nil},
		{"DefaultTime2Wait", "20", false, "20", nil},
		{"DefaultTime2Retain", "20", false, "0", nil},
		{"MaxOutstandingR2T", "1", false, "1", nil},
		{"MaxOutstandingR2T", "64", false, "8", nil},
		{"DataPDUInOrder", "No", false, "Yes", func(p params) bool { return p.DataPDUInOrder }},
		{"DataSequenceInOrder", "No", false, "Yes", nil},
		{"ErrorRecoveryLevel", "2", false, "0", func(p params) bool { return p.ErrorRecoveryLevel == 0 }},
		{"ErrorRecoveryLevel", "3", false, "Reject", nil},
		{"IFMarker", "Yes", false, "No", nil},
		{"OFMarkInt", "2048~8192", false, "Irrelevant", nil},
		{"AuthMethod", "CHAP,None", false, "None", nil},
		{"AuthMethod", "CHAP", false, "Reject", nil},
		{"X-com.example.Foo", "1", false, "NotUnderstood", nil},
		{"Bogus", "1", false, "NotUnderstood", nil},
		{"TargetAddress", "1.2.3.4", false, "Reject", nil},
		{"MaxBurstLength", "65536", true, "Irrelevant", nil},
		{"InitialR2T", "No", true, "Irrelevant", nil},
		{"HeaderDigest", "None", true, "None", nil},
		{"MaxConnections", "NotUnderstood", false, "", nil},
	}
	for _, tc := range cases {
		p := defaultParams(pol.MaxRecvDataSegmentLength)
		r, ok := negotiateKey(&p, &pol, textKV{tc.key, tc.offer}, tc.discovery)
		got := ""
		if ok {
			if r.Key != tc.key {
				t.Errorf("%s=%s: answered key %q", tc.key, tc.offer, r.Key)
			}
			got = r.Value
		}
		if got != tc.want {
			t.Errorf("%s=%s (discovery=%v): answer %q, want %q", tc.key, tc.offer, tc.discovery, got, tc.want)
		}
		if tc.check != nil && !tc.check(p) {
			t.Errorf("%s=%s: params not updated: %+v", tc.key, tc.offer, p)
		}
	}
}

func TestFirstBurstNeverExceedsMaxBurst(t *testing.T) {
	pol := DefaultPolicy()
	p := defaultParams(pol.MaxRecvDataSegmentLength)
	negotiateKey(&p, &pol, textKV{"MaxBurstLength", "16384"}, false)
	negotiateKey(&p, &pol, textKV{"FirstBurstLength", "65536"}, false)
	p.finish()
	if p.FirstBurstLength > p.MaxBurstLength {
		t.Fatalf("FirstBurstLength %d > MaxBurstLength %d", p.FirstBurstLength, p.MaxBurstLength)
	}
}

func TestCommandWindow(t *testing.T) {
	w := newCmdWindow(10, 4, nil)
	if w.maxCmdSN() != 13 {
		t.Fatalf("MaxCmdSN %d, want 13", w.maxCmdSN())
	}
	if w.accept(11, false) {
		t.Fatal("CmdSN ahead of ExpCmdSN accepted")
	}
	if w.accept(9, false) {
		t.Fatal("old CmdSN accepted")
	}
	// An immediate command (e.g. NOP-Out ping with I set) takes no CmdSN.
	if !w.accept(10, true) || w.expCmdSN != 10 {
		t.Fatal("immediate command moved the window")
	}
	for sn := uint32(10); sn < 14; sn++ {
		if !w.accept(sn, false) {
			t.Fatalf("CmdSN %d refused inside window", sn)
		}
	}
	if w.maxCmdSN() != 13 {
		t.Fatalf("MaxCmdSN moved while commands are in flight: %d", w.maxCmdSN())
	}
	if w.accept(14, false) {
		t.Fatal("CmdSN beyond MaxCmdSN accepted")
	}
	w.done()
	if w.maxCmdSN() != 14 || !w.accept(14, false) {
		t.Fatal("completion did not open the window")
	}
	// Serial arithmetic across the 2^32 wrap.
	w = newCmdWindow(0xffffffff, 2, nil)
	if !w.accept(0xffffffff, false) || !w.accept(0, false) || w.expCmdSN != 1 {
		t.Fatal("window does not wrap")
	}
	if w.maxCmdSN() != 0 || w.accept(1, false) {
		t.Fatal("MaxCmdSN across the wrap: full window must refuse the next CmdSN")
	}
	w.done()
	if w.maxCmdSN() != 1 || !w.accept(1, false) {
		t.Fatalf("MaxCmdSN after a completion across the wrap: %d, want 1", w.maxCmdSN())
	}
}

// A tenant's fair share shrinks its sessions' windows as their commands complete, never by
// taking back a CmdSN already granted, and a share that grows again reopens them.
func TestCommandWindowFollowsTheTenantShare(t *testing.T) {
	var share atomic.Uint32
	w := newCmdWindow(1, 8, &share)
	if got := w.maxCmdSN(); got != 8 {
		t.Fatalf("MaxCmdSN %d, want the login's 8", got)
	}
	share.Store(2)
	for sn := uint32(1); sn <= 4; sn++ {
		if !w.accept(sn, false) {
			t.Fatalf("CmdSN %d granted before the share shrank was refused", sn)
		}
	}
	if got := w.maxCmdSN(); got != 8 {
		t.Fatalf("MaxCmdSN went back to %d: a granted CmdSN was taken away", got)
	}
	for range 3 {
		w.done()
	}
	// One in flight, share 2: one more slot, i.e. MaxCmdSN = ExpCmdSN (5); still below 8.
	if got := w.maxCmdSN(); got != 8 {
		t.Fatalf("MaxCmdSN %d, want 8 until the granted window is used", got)
	}
	for sn := uint32(5); sn <= 8; sn++ {
		if !w.accept(sn, false) {
			t.Fatalf("CmdSN %d inside the granted window refused", sn)
		}
		w.done()
	}
	// ExpCmdSN 9, one in flight, share 2: exactly one new command.
	if got := w.maxCmdSN(); got != 9 {
		t.Fatalf("MaxCmdSN %d, want 9 (share 2, one in flight)", got)
	}
	if !w.accept(9, false) {
		t.Fatal("CmdSN 9 refused")
	}
	if got := w.maxCmdSN(); got != 9 {
		t.Fatalf("MaxCmdSN %d with the share used up, want it held at 9", got)
	}
	if w.accept(10, false) {
		t.Fatal("CmdSN 10, beyond the advertised MaxCmdSN 9, accepted: the share could be bypassed")
	}
	share.Store(0)
	if got := w.maxCmdSN(); got != 9+8-2 {
		t.Fatalf("MaxCmdSN %d after the share was lifted, want %d", got, 9+8-2)
	}
}
