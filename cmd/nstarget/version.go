package main

import (
	"runtime"
	"runtime/debug"

	"nstarget/backend/rbd"
)

// buildVersion is set at link time by the Makefile from `git describe --always --dirty`
// (-ldflags "-X main.buildVersion=…"). A plain `go build` or `go install` leaves it empty, and
// version falls back to what Go stamps into every binary built from a checkout.
var buildVersion string

// version is what `nstarget version` prints and the startup line shows:
// "nstarget VERSION GOVERSION backends=file[,rbd]": which volume backends this binary has
// (rbd needs librbd and the rbd build tag).
func version() string {
	bi, ok := debug.ReadBuildInfo()
	backends := "file"
	if rbd.Compiled {
		backends += ",rbd"
	}
	return "nstarget " + versionOf(buildVersion, bi, ok) + " " + runtime.Version() + " backends=" + backends
}

// versionOf picks the most precise version available: the linked one, else the module version
// (go install …@vX), else the VCS revision (12 digits, like git's abbreviation with room to
// stay unique) with -dirty for a modified tree, else "(devel)".
func versionOf(linked string, bi *debug.BuildInfo, ok bool) string {
	if linked != "" {
		return linked
	}
	if !ok || bi == nil {
		return "(devel)"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	rev, dirty := "", ""
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return "(devel)"
	}
	return rev[:min(12, len(rev))] + dirty
}
