package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"nstarget/conf"
	"nstarget/netnsmux"
)

// demoTools are what the demo's initiators need; scripts/deps.sh installs them.
var demoTools = []string{"ip", "iscsi-ls", "iscsi-readcapacity16", "qemu-io"}

type demoTenant struct {
	name, netns, iniNetns string
	pattern               byte
	// results
	discovered []string
	capacity   string
	wrote      string
	readBack   string
	err        error
}

func cmdDemo(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	once := fs.Bool("exit", false, "exit after printing the table instead of serving until Ctrl-C")
	fs.BoolVar(once, "once", false, "same as -exit")
	var lf logFlags
	lf.register(fs, "warn")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	for _, t := range demoTools {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s not found: run scripts/deps.sh as root (make demo does)", t)
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces: run it as root")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runDemo(ctx, *once, stdout, log)
}

func runDemo(ctx context.Context, once bool, out io.Writer, log *slog.Logger) (err error) {
	prefix := fmt.Sprintf("nstdemo-%d", os.Getpid())
	// Everything created is undone in reverse order, whatever happens below.
	var undo []func()
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		fmt.Fprintf(out, "removed namespaces %s-*, their veths and the temporary pool\n", prefix)
	}()

	pool, err := os.MkdirTemp("", "nstdemo-pool-")
	if err != nil {
		return fmt.Errorf("temporary pool: %w", err)
	}
	undo = append(undo, func() { os.RemoveAll(pool) })

	tenants := []*demoTenant{
		{name: "a", pattern: 0xa1},
		{name: "b", pattern: 0xb2},
		{name: "c", pattern: 0xc3},
	}
	for _, t := range tenants {
		t.netns = prefix + "-" + t.name
		t.iniNetns = prefix + "-" + t.name + "-ini"
		for _, ns := range []string{t.netns, t.iniNetns} {
			if err := ipCmd(ctx, "netns", "add", ns); err != nil {
				return err
			}
			undo = append(undo, func() { ipCmd(context.Background(), "netns", "del", ns) })
		}
		if err := pairNamespaces(ctx, t.netns, t.iniNetns); err != nil {
			return err
		}
	}

	doc := strings.NewReplacer("@PREFIX@", prefix, "@POOL@", pool).Replace(demoConfig)
	cfg, err := conf.Parse("demo.toml (embedded)", []byte(doc))
	if err != nil {
		return fmt.Errorf("embedded config: %w", err)
	}

	// Serve in-process; learn from netnsmux events when every tenant listens.
	up := make(chan string, 64)
	serveCtx, stopServe := context.WithCancel(context.Background())
	serveDone := make(chan error, 1)
	go func() {
		serveDone <- serve(serveCtx, cfg, serveOptions{Logger: log, OnEvent: func(ev netnsmux.Event) {
			if ev.Kind == netnsmux.ListenerUp {
				select {
				case up <- ev.Namespace:
				default:
				}
			}
		}})
	}()
	undo = append(undo, func() {
		stopServe()
		if err := <-serveDone; err != nil {
			log.Error("serve", "err", err)
		}
	})
	waiting := map[string]bool{}
	for _, t := range tenants {
		waiting[t.netns] = true
	}
	// Generous: namespaces come up in well under a second, but `make test` runs this beside
	// other suites on two cores.
	const listenWait = 60 * time.Second
	deadline := time.After(listenWait)
	for len(waiting) > 0 {
		select {
		case ns := <-up:
			delete(waiting, ns)
		case err := <-serveDone:
			serveDone <- err
			return fmt.Errorf("serve: %w", err)
		case <-deadline:
			return fmt.Errorf("tenants not listening after %v: %v", listenWait, waiting)
		case <-ctx.Done():
			return nil
		}
	}
	fmt.Fprintf(out, "nstarget demo: serving 3 tenants from one process; every tenant is at 10.0.0.1:3260 with IQN %s\n\n",
		"iqn.2026-11.io.nstarget:demo")

	// Write every tenant's pattern first, then read all back: if tenants shared anything, the
	// last writer's pattern would show up everywhere.
	var wg sync.WaitGroup
	for _, t := range tenants {
		wg.Add(1)
		go func() { defer wg.Done(); t.discoverAndWrite(ctx) }()
	}
	wg.Wait()
	for _, t := range tenants {
		t.readBackOwn(ctx)
	}
	printDemoTable(out, tenants)

	failed := 0
	for _, t := range tenants {
		if t.err != nil {
			failed++
			fmt.Fprintf(out, "tenant %s: %v\n", t.name, t.err)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d tenants failed", failed, len(tenants))
	}
	fmt.Fprintln(out, "\nAll tenants dialled 10.0.0.1:3260 and wrote to the same IQN, all writes first, then all reads:")
	fmt.Fprintln(out, "each read back only its own pattern, from its own volume in the one shared pool.")
	if once {
		return nil
	}
	fmt.Fprintf(out, "\nstill serving; try: ip netns exec %s iscsi-ls -s iscsi://10.0.0.1\nCtrl-C stops and removes everything.\n", tenants[0].iniNetns)
	<-ctx.Done()
	return nil
}

// pairNamespaces links a tenant namespace and its initiator namespace with a veth pair:
// 10.0.0.1/24 on the tenant end, 10.0.0.2/24 on the initiator end. The veth is created inside
// the namespaces, so its names never clash and it dies with them.
func pairNamespaces(ctx context.Context, tenantNS, iniNS string) error {
	steps := [][]string{
		{"-n", tenantNS, "link", "add", "nst0", "type", "veth", "peer", "name", "nst1", "netns", iniNS},
		{"-n", tenantNS, "addr", "add", "10.0.0.1/24", "dev", "nst0"},
		{"-n", iniNS, "addr", "add", "10.0.0.2/24", "dev", "nst1"},
		{"-n", tenantNS, "link", "set", "lo", "up"},
		{"-n", iniNS, "link", "set", "lo", "up"},
		{"-n", tenantNS, "link", "set", "nst0", "up"},
		{"-n", iniNS, "link", "set", "nst1", "up"},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

func ipCmd(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// inNetns runs an initiator tool inside a namespace with a timeout.
func inNetns(ctx context.Context, ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

var (
	targetLine = regexp.MustCompile(`Target:(\S+)`)
	sizeLine   = regexp.MustCompile(`Total size:\s*(\d+)`)
)

func (t *demoTenant) discoverAndWrite(ctx context.Context) {
	out, err := inNetns(ctx, t.iniNetns, "iscsi-ls", "-s", "iscsi://10.0.0.1")
	if err != nil {
		t.err = fmt.Errorf("discovery: %w", err)
		return
	}
	for _, m := range targetLine.FindAllStringSubmatch(out, -1) {
		t.discovered = append(t.discovered, m[1])
	}
	url := "iscsi://10.0.0.1/" + demoIQN + "/0"
	out, err = inNetns(ctx, t.iniNetns, "iscsi-readcapacity16", url)
	if err != nil {
		t.err = fmt.Errorf("read capacity: %w", err)
		return
	}
	if m := sizeLine.FindStringSubmatch(out); m != nil {
		t.capacity = humanBytes(m[1])
	} else {
		t.capacity = strings.TrimSpace(out)
	}
	p := fmt.Sprintf("0x%02x", t.pattern)
	if _, err := inNetns(ctx, t.iniNetns, "qemu-io", "-f", "raw", "-c", "write -P "+p+" 0 1M", url); err != nil {
		t.err = fmt.Errorf("write: %w", err)
		return
	}
	t.wrote = "1 MiB of " + p
}

func (t *demoTenant) readBackOwn(ctx context.Context) {
	if t.err != nil {
		return
	}
	p := fmt.Sprintf("0x%02x", t.pattern)
	out, err := inNetns(ctx, t.iniNetns, "qemu-io", "-f", "raw", "-c", "read -P "+p+" 0 1M", "iscsi://10.0.0.1/"+demoIQN+"/0")
	switch {
	case err != nil:
		t.err = fmt.Errorf("read back: %w", err)
	case strings.Contains(out, "Pattern verification failed"):
		t.readBack = "MISMATCH"
		t.err = errors.New("read back: another pattern found: tenants are not isolated")
	default:
		t.readBack = "own pattern, intact"
	}
}

func humanBytes(s string) string {
	var n int64
	fmt.Sscan(s, &n)
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return s + " bytes"
}

func printDemoTable(out io.Writer, tenants []*demoTenant) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TENANT\tNAMESPACE\tINITIATOR NS\tDISCOVERED TARGETS\tLUN 0 SIZE\tWROTE\tREAD BACK")
	for _, t := range tenants {
		disc := strings.Join(t.discovered, ",")
		if disc == "" {
			disc = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.name, t.netns, t.iniNetns, disc,
			dash(t.capacity), dash(t.wrote), dash(t.readBack))
	}
	tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
