package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"nstarget/conf"
	"nstarget/fleet"
)

// cmdFleet makes or removes many tenant namespaces at once, in-process, and writes a matching
// configuration: for benchmarks, tests and trying nstarget with many tenants.
func cmdFleet(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usageError{"fleet needs create or delete"}
	}
	switch args[0] {
	case "create":
		return fleetCreate(args[1:], stdout, stderr)
	case "delete":
		return fleetDelete(args[1:], stderr)
	}
	return usageError{fmt.Sprintf("unknown fleet command %q (create, delete)", args[0])}
}

var fleetPrefix = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

func fleetFlags(name string) (*flag.FlagSet, *string, *string) {
	fs := flag.NewFlagSet("fleet "+name, flag.ContinueOnError)
	prefix := fs.String("prefix", "", "namespace and tenant names are PREFIX-0001 …")
	dir := fs.String("netns-dir", conf.DefaultNetnsDir, "directory of the namespaces")
	return fs, prefix, dir
}

func checkPrefix(p string) error {
	if !fleetPrefix.MatchString(p) {
		return usageError{fmt.Sprintf("-prefix %q: letters, digits, '_', '.' and '-', not starting with a symbol", p)}
	}
	return nil
}

func fleetName(prefix string, i int) string { return fmt.Sprintf("%s-%04d", prefix, i) }

func fleetCreate(args []string, stdout, stderr io.Writer) error {
	fs, prefix, dir := fleetFlags("create")
	count := fs.Int("count", 0, "how many namespaces")
	out := fs.String("config", "", "write the matching configuration here (default: standard output)")
	dataDir := fs.String("data-dir", "/var/lib/nstarget-fleet", "data_dir of the configuration")
	size := fs.String("size", "8MiB", "size of each tenant's volume")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := checkPrefix(*prefix); err != nil {
		return err
	}
	if *count < 1 || *count > 9999 {
		return usageError{fmt.Sprintf("-count %d: 1..9999", *count)}
	}
	start := time.Now()
	for i := 1; i <= *count; i++ {
		if _, err := fleet.Add(*dir, fleetName(*prefix, i)); err != nil {
			// All or nothing: remove what this call made.
			for j := 1; j < i; j++ {
				fleet.Delete(*dir, fleetName(*prefix, j))
			}
			return err
		}
	}
	took := time.Since(start)
	fmt.Fprintf(stderr, "created %d namespaces in %s in %v (%v each)\n", *count, *dir, took.Round(time.Millisecond), (took / time.Duration(*count)).Round(time.Microsecond))
	var b strings.Builder
	fmt.Fprintf(&b, "# %d tenants made by `nstarget fleet create -prefix %s`; remove them with `nstarget fleet delete -prefix %s`.\n", *count, *prefix, *prefix)
	fmt.Fprintf(&b, "[server]\nnetns_dir = %q\ndata_dir = %q\n", *dir, *dataDir)
	for i := 1; i <= *count; i++ {
		n := fleetName(*prefix, i)
		fmt.Fprintf(&b, "\n[[tenant]]\nname = %q\nportal = \"127.0.0.1:3260\"\n  [[tenant.target]]\n  iqn = \"iqn.2026-12.org.nstarget:fleet\"\n    [[tenant.target.lun]]\n    volume = %q\n    size = %q\n", n, n, *size)
	}
	if *out == "" {
		_, err := io.WriteString(stdout, b.String())
		return err
	}
	return os.WriteFile(*out, []byte(b.String()), 0o644)
}

func fleetDelete(args []string, stderr io.Writer) error {
	fs, prefix, dir := fleetFlags("delete")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := checkPrefix(*prefix); err != nil {
		return err
	}
	ents, err := os.ReadDir(*dir)
	if err != nil {
		return fmt.Errorf("fleet delete: %w", err)
	}
	mine := regexp.MustCompile(`^` + regexp.QuoteMeta(*prefix) + `-[0-9]{4}$`)
	var errs []error
	n := 0
	start := time.Now()
	for _, e := range ents {
		if !mine.MatchString(e.Name()) {
			continue
		}
		if err := fleet.Delete(*dir, e.Name()); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	fmt.Fprintf(stderr, "deleted %d namespaces from %s in %v\n", n, *dir, time.Since(start).Round(time.Millisecond))
	return errors.Join(errs...)
}
