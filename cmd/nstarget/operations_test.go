package main

import (
	"bytes"
	"runtime/debug"
	"strings"
	"testing"

	"nstarget/backend/rbd"
)

func TestVersionPrefersTheLinkedVersionThenModuleThenVCS(t *testing.T) {
	vcs := &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"},
		{Key: "vcs.modified", Value: "true"},
	}}
	for _, c := range []struct {
		name   string
		linked string
		bi     *debug.BuildInfo
		ok     bool
		want   string
	}{
		{"linked by the Makefile", "v1.2.3-4-gabcdef-dirty", vcs, true, "v1.2.3-4-gabcdef-dirty"},
		{"go install of a tagged module", "", &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}}, true, "v1.2.3"},
		{"go build in a modified checkout", "", vcs, true, "0123456789ab-dirty"},
		{"no build information", "", nil, false, "(devel)"},
		{"no VCS stamp", "", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, true, "(devel)"},
	} {
		if got := versionOf(c.linked, c.bi, c.ok); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

func TestVersionCommandPrintsNameVersionGoAndBackends(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"version"}, &out, &errOut); code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	f := strings.Fields(out.String())
	if len(f) != 4 || f[0] != "nstarget" || f[1] == "" || !strings.HasPrefix(f[2], "go") || !strings.HasPrefix(f[3], "backends=file") ||
		strings.Contains(f[3], "rbd") != rbd.Compiled {
		t.Fatalf("version printed %q, want \"nstarget VERSION goX.Y backends=file[,rbd]\"", out.String())
	}
}

func TestServeHelpListsItsFlags(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"serve", "-h"}, &out, &errOut); code != exitOK {
		t.Fatalf("serve -h: exit %d: %s", code, errOut.String())
	}
	for _, flag := range []string{"-c FILE", "-pprof", "-socket", "-log-level", "-log-format", defaultConfig} {
		if !strings.Contains(out.String(), flag) {
			t.Errorf("serve -h does not mention %s:\n%s", flag, out.String())
		}
	}
}

func TestCheckWithoutDashCReadsTheDefaultConfigPath(t *testing.T) {
	// check only reads, so this is safe whether or not the machine has the file: either way
	// the output names it.
	var out, errOut bytes.Buffer
	run([]string{"check"}, &out, &errOut)
	if !strings.Contains(out.String()+errOut.String(), defaultConfig) {
		t.Fatalf("check without -c did not read %s:\n%s%s", defaultConfig, out.String(), errOut.String())
	}
}
