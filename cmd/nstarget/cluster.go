package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"nstarget/cluster"
	"nstarget/conf"
)

const clusterUsage = `usage: nstarget cluster <command> [flags]

commands:
  apply  -c FILE [-endpoints URL,...] [-prefix P] [-allow-empty]
                    validate FILE as 'nstarget check' does (without the volume pool, which
                    is per node) and publish its [[tenant]] sections to etcd: every node of
                    the cluster places, claims and serves them; publishing the same tenants
                    again changes nothing; a file without tenants needs -allow-empty, since
                    it stops every tenant of the cluster
  status [-endpoints URL,...] [-prefix P] [-o text|json]
                    the published set, the live nodes (lease, TTL left) and every tenant's
                    owner and placement

common flags:
  -endpoints URL,...   etcd client URLs (default http://127.0.0.1:2379)
  -prefix P            key prefix of the cluster (default /nstarget)
  -timeout D           for the whole command (default 10s)
`

// runCluster is `nstarget cluster …`: it publishes tenant sets and shows the cluster, through
// package cluster. It returns the exit code.
func runCluster(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "nstarget cluster: missing command (apply, status)\n"+clusterUsage)
		return exitUsage
	}
	var err error
	switch args[0] {
	case "apply":
		err = clusterApply(args[1:], stdout)
	case "status":
		err = clusterStatus(args[1:], stdout)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, clusterUsage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "nstarget cluster: unknown command %q\n%s", args[0], clusterUsage)
		return exitUsage
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, clusterUsage)
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "nstarget cluster %s: %s\nrun 'nstarget cluster help' for usage\n", args[0], ue.msg)
		return exitUsage
	default:
		fmt.Fprintf(stderr, "nstarget cluster %s: %v\n", args[0], err)
		return exitFail
	}
}

// clusterFlags are the flags of every cluster command.
type clusterFlags struct {
	endpoints string
	prefix    string
	timeout   time.Duration
}

func (c *clusterFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.endpoints, "endpoints", "http://127.0.0.1:2379", "etcd client URLs, comma-separated")
	fs.StringVar(&c.prefix, "prefix", "/nstarget", "key prefix of the cluster")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "for the whole command")
}

func parseClusterFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

// connect returns a client and a context bounded by -timeout; the caller closes and cancels.
func (c *clusterFlags) connect() (*clientv3.Client, context.Context, context.CancelFunc, error) {
	var eps []string
	for _, e := range strings.Split(c.endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	if len(eps) == 0 {
		return nil, nil, nil, usageError{"-endpoints is empty"}
	}
	if c.timeout <= 0 {
		return nil, nil, nil, usageError{fmt.Sprintf("-timeout %v must be positive", c.timeout)}
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: c.timeout, Logger: zap.NewNop()})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("etcd %v: %w", eps, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	return cli, ctx, cancel, nil
}

func clusterApply(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("cluster apply", flag.ContinueOnError)
	file := fs.String("c", "", "configuration file whose tenants to publish")
	allowEmpty := fs.Bool("allow-empty", false, "publish a file without tenants (stops every tenant)")
	var cf clusterFlags
	cf.register(fs)
	if err := parseClusterFlags(fs, args); err != nil {
		return err
	}
	if *file == "" {
		return usageError{"missing -c FILE"}
	}
	data, err := os.ReadFile(*file)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	names, body, err := clusterTenantsDoc(*file, data)
	if err != nil {
		return err
	}
	if len(names) == 0 && !*allowEmpty {
		return fmt.Errorf("%s has no [[tenant]]: publishing it would stop every tenant of the cluster (-allow-empty to do that)", *file)
	}
	cli, ctx, cancel, err := cf.connect()
	if err != nil {
		return err
	}
	defer cli.Close()
	defer cancel()
	p, err := cluster.Publish(ctx, cli, cf.prefix, names, body)
	if err != nil {
		return err
	}
	what := "published"
	if !p.Changed {
		what = "unchanged"
	}
	fmt.Fprintf(stdout, "%s: %d tenants from %s at %s/tenants, revision %d, sha256 %s\n",
		what, len(names), *file, strings.TrimRight(cf.prefix, "/"), p.Revision, p.SHA256[:16])
	return nil
}

// clusterTenantsDoc validates a whole configuration file as check does (server section
// included: tenant limits are checked against it), and returns its tenant names and the
// published body: the [[tenant]] tables alone, re-encoded as TOML. A node puts its own
// [server] section before the body and parses the result with conf.Parse.
//
// Re-encoding rather than cutting the text out: TOML lets [server] come after the tenants and
// keys of one table spread over the file, so no slice of the text is reliably "the tenants";
// the price is that comments are dropped. The body is parsed again here, behind the file's
// own [server] section, so a body that would not read back the same tenants is never
// published.
func clusterTenantsDoc(file string, data []byte) ([]string, []byte, error) {
	cfg, err := conf.Parse(file, data)
	if err != nil {
		return nil, nil, clusterConfErrors(err)
	}
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", file, err) // conf.Parse accepted it: cannot happen
	}
	var body bytes.Buffer
	if t, ok := raw["tenant"]; ok {
		if err := toml.NewEncoder(&body).Encode(map[string]any{"tenant": t}); err != nil {
			return nil, nil, fmt.Errorf("%s: encode tenants: %w", file, err)
		}
	}
	var server bytes.Buffer
	if s, ok := raw["server"]; ok {
		if err := toml.NewEncoder(&server).Encode(map[string]any{"server": s}); err != nil {
			return nil, nil, fmt.Errorf("%s: encode server: %w", file, err)
		}
	}
	again, err := conf.Parse(file, append(server.Bytes(), body.Bytes()...))
	if err != nil {
		return nil, nil, fmt.Errorf("%s: the tenants section does not read back on its own: %w", file, err)
	}
	names := make([]string, len(cfg.Tenants))
	for i, t := range cfg.Tenants {
		names[i] = t.Name
	}
	back := make([]string, len(again.Tenants))
	for i, t := range again.Tenants {
		back[i] = t.Name
	}
	if !slices.Equal(names, back) {
		return nil, nil, fmt.Errorf("%s: the tenants section reads back as %v, not %v", file, back, names)
	}
	return names, body.Bytes(), nil
}

// clusterConfErrors puts each finding of a multi-error on its own line.
func clusterConfErrors(err error) error {
	var es conf.Errors
	if errors.As(err, &es) && len(es) > 1 {
		return fmt.Errorf("%d errors:\n  %s", len(es), strings.ReplaceAll(es.Error(), "\n", "\n  "))
	}
	return err
}

func clusterStatus(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("cluster status", flag.ContinueOnError)
	format := fs.String("o", "text", "text|json")
	var cf clusterFlags
	cf.register(fs)
	if err := parseClusterFlags(fs, args); err != nil {
		return err
	}
	if *format != "text" && *format != "json" {
		return usageError{fmt.Sprintf("bad -o %q (text, json)", *format)}
	}
	cli, ctx, cancel, err := cf.connect()
	if err != nil {
		return err
	}
	defer cli.Close()
	defer cancel()
	st, err := cluster.Status(ctx, cli, cf.prefix)
	if err != nil {
		return err
	}
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printClusterStatus(stdout, st)
	return nil
}

func printClusterStatus(w io.Writer, st *cluster.Report) {
	if st.Doc == nil {
		fmt.Fprintln(w, "tenant set: none published")
	} else {
		fmt.Fprintf(w, "tenant set: revision %d, %d tenants, %d bytes, sha256 %s, published %s\n",
			st.Doc.Revision, st.Doc.Tenants, st.Doc.Bytes, st.Doc.SHA256[:16], st.Doc.Published.Format(time.RFC3339))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nNODE\tADDRESS\tLEASE\tTTL\tOWNS\tPLACED\tSTARTED\n")
	for _, n := range st.Nodes {
		ttl := n.TTL.String()
		if n.TTL < 0 {
			ttl = "expired"
		}
		fmt.Fprintf(tw, "%s\t%s\t%x\t%s\t%d\t%d\t%s\n", n.Name, clusterDash(n.Address), n.Lease, ttl, n.Owns, n.Placed, n.Started.Format(time.RFC3339))
	}
	fmt.Fprintf(tw, "\nTENANT\tOWNER\tPLACED\tSTATE\n")
	for _, t := range st.Tenants {
		state := "serving"
		switch {
		case t.Owner == "" && t.Placed == "":
			state = "no live node"
		case t.Owner == "":
			state = "unowned"
		case t.Owner != t.Placed:
			state = "moving"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, clusterDash(t.Owner), clusterDash(t.Placed), state)
	}
	for _, t := range st.Strays {
		fmt.Fprintf(tw, "%s\t%s\t-\tnot in the set (released soon)\n", t.Name, clusterDash(t.Owner))
	}
	tw.Flush()
	for _, e := range st.Errors {
		fmt.Fprintf(w, "warning: %s\n", e)
	}
}

func clusterDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
