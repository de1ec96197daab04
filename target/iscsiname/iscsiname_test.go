package iscsiname

import (
	"strings"
	"testing"
)

func TestValidNames(t *testing.T) {
	for _, n := range []string{
		"iqn.2026-11.com.example:acme.db", "iqn.1993-08.org.debian:01:host1", "iqn.2001-04.com.example",
		"eui.02004567A425678D", "naa.52004567BA64678D", "naa.62004567BA64678D0123456789ABCDEF",
		"iqn.2026-11.io.example:" + strings.Repeat("x", 223-len("iqn.2026-11.io.example:")),
	} {
		if err := Check(n); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
}

func TestInvalidNamesSayWhy(t *testing.T) {
	for _, c := range []struct{ name, why string }{
		{"", "empty"},
		{"iqn.2026-11.io.example:" + strings.Repeat("x", 224-len("iqn.2026-11.io.example:")), "limit is 223"},
		{"iqn.example.com:t", "date yyyy-mm"},
		{"iqn.2026-13.io.example:t", "month"},
		{"iqn.2026-11.:t", "domain"},
		{"iqn.2026-11.io..example", "empty label"},
		{"iqn.2026-11.-io.example", "starts or ends with '-'"},
		{"iqn.2026-11.io.Example:t", "lower case"},
		{"iqn.2026-11.io.example:t_1", "not allowed"},
		{"eui.02004567A425678", "16 hex"},
		{"naa.52004567BA64678Z", "hex"},
		{"naa.52004567BA64678D01", "16 or 32 hex"},
		{"target0", "iqn., eui. or naa."},
	} {
		err := Check(c.name)
		if err == nil || !strings.Contains(err.Error(), c.why) {
			t.Errorf("Check(%q) = %v, want an error saying %q", c.name, err, c.why)
		}
	}
}
