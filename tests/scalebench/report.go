//go:build linux

package main

import (
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"nstarget/tests/svgplot"
)

type report struct {
	Start, LoadStart, LoadEnd string
	Nice                      int
	KernelPerNS               float64
	KernelDetail              string
	NSCreate                  float64
	Sweep                     []*sweepRow
	Strace                    string
	StraceCalls               int
	StraceRaw                 string
	Fair                      *fairReport
	Churn                     *churnReport
	ChurnBase                 *churnReport // the base binary's churn (-base-nst), same run
}

func mark(ok bool) string {
	if ok {
		return "ok"
	}
	return "MISSED"
}

func (r *report) row(n int) *sweepRow {
	for _, s := range r.Sweep {
		if s.N == n {
			return s
		}
	}
	return nil
}

func (r *report) print(b *bench, w io.Writer) {
	fmt.Fprintf(w, "\nscalebench (issue 11): started %s, load average at start %s, now %s, %d CPUs; %d round(s) x %v per I/O run; medians\n",
		r.Start, r.LoadStart, loadavg(), runtime.NumCPU(), b.rounds, b.runtime)
	fmt.Fprintf(w, "load: %d sessions over min(N,%d) tenants, own Go initiator (tests/scalebench) in the tenants' namespaces; 4K = random read QD16 per session, 1M = sequential read QD4 per session; page-cached 64 MiB volumes\n",
		b.active, b.active)
	fmt.Fprintf(w, "CPU%% = server utime+stime / wall (100%% = one core); us/IO = server CPU time per I/O; nice level of servers and load clients: %d\n\n", r.Nice)

	// 2. Data path at scale.
	if len(r.Sweep) > 0 && len(r.Sweep[0].IOPS4k) > 0 {
		fmt.Fprintf(w, "== data path and resources vs configured tenants\n")
		fmt.Fprintf(w, "%6s | %8s %7s %7s %5s %6s | %7s %7s %5s %6s | %5s %5s | %8s %8s %5s | %s\n",
			"tenants", "4K IOPS", "p50 us", "p99 us", "CPU%", "us/IO", "1M MiB/s", "p99 ms", "CPU%", "us/IO", "thr", "busy", "RSS MiB", "busy", "fds", "setns during I/O (per round)")
		for _, s := range r.Sweep {
			if len(s.IOPS4k) == 0 {
				continue
			}
			fmt.Fprintf(w, "%7d | %8.0f %7.0f %7.0f %5.0f %6.1f | %8.0f %7.1f %5.0f %6.1f | %5.0f %5.0f | %8.1f %8.1f %5.0f | %s\n",
				s.N, median(s.IOPS4k), median(s.P50_4k), median(s.P99_4k), median(s.CPU4k), median(s.Us4k),
				median(s.MiB1m), median(s.P99_1m)/1000, median(s.CPU1m), median(s.Us1m),
				median(s.ThrIdle), median(s.ThrBusy), median(s.RSSIdle)/(1<<20), median(s.RSSBusy)/(1<<20), median(s.FDsIdle), joinF(s.SetnsDelta, "%.0f"))
		}
		lo, hi := r.row(b.active), r.Sweep[len(r.Sweep)-1]
		if lo != nil && hi != nil && hi != lo && len(lo.IOPS4k) > 0 && len(hi.IOPS4k) > 0 {
			ri := median(hi.IOPS4k) / median(lo.IOPS4k)
			rb := median(hi.MiB1m) / median(lo.MiB1m)
			// The two counts run back to back in every round: per-round ratios cancel slow drift.
			var pri, prb []float64
			for k := 0; k < min(len(hi.IOPS4k), len(lo.IOPS4k)); k++ {
				pri = append(pri, hi.IOPS4k[k]/lo.IOPS4k[k])
			}
			for k := 0; k < min(len(hi.MiB1m), len(lo.MiB1m)); k++ {
				prb = append(prb, hi.MiB1m[k]/lo.MiB1m[k])
			}
			fmt.Fprintf(w, "\n%-58s %-10s %-10s %s\n", "goal", "measured", "", "per round")
			fmt.Fprintf(w, "%-58s %-10s %-10s %s vs %s; median of per-round ratios %s (%s)\n", fmt.Sprintf("4K IOPS, %d configured / %d configured >= 0.99", hi.N, lo.N), trunc(ri), mark(ri >= 0.99), joinF(hi.IOPS4k, "%.0f"), joinF(lo.IOPS4k, "%.0f"), trunc(median(pri)), joinF(pri, "%.3f"))
			fmt.Fprintf(w, "%-58s %-10s %-10s %s vs %s; median of per-round ratios %s (%s)\n", fmt.Sprintf("1M MiB/s, %d configured / %d configured >= 0.99", hi.N, lo.N), trunc(rb), mark(rb >= 0.99), joinF(hi.MiB1m, "%.0f"), joinF(lo.MiB1m, "%.0f"), trunc(median(prb)), joinF(prb, "%.3f"))
			// Server CPU per I/O is much less sensitive to other load on the machine than
			// throughput: the cost the configured tenants add to each I/O, if any, shows here.
			fmt.Fprintf(w, "%-58s %-10s %-10s 4K %.2f vs %.2f us, 1M %.0f vs %.0f us per I/O\n", fmt.Sprintf("server CPU per I/O, %d configured / %d configured", hi.N, lo.N),
				fmt.Sprintf("%s/%s", trunc(median(hi.Us4k)/median(lo.Us4k)), trunc(median(hi.Us1m)/median(lo.Us1m))), "(info)", median(hi.Us4k), median(lo.Us4k), median(hi.Us1m), median(lo.Us1m))
			var sw float64
			for _, s := range r.Sweep {
				for _, v := range s.SetnsDelta {
					sw += v
				}
			}
			fmt.Fprintf(w, "%-58s %-10.0f %-10s (Mux Stats Switches = nstarget_netns_setns_total, before/after logins+I/O+logouts, all counts and rounds)\n", "setns calls on the data path = 0 (counter)", sw, mark(sw == 0))
			if r.Strace != "" {
				fmt.Fprintf(w, "%-58s %-10d %-10s %s\n", "setns calls on the data path = 0 (strace)", r.StraceCalls, mark(r.StraceCalls == 0), r.Strace)
			}
		}
		// 7. Resources.
		var xs, ys []float64
		for _, s := range r.Sweep {
			if len(s.RSSIdle) > 0 {
				xs = append(xs, float64(s.N))
				ys = append(ys, median(s.RSSIdle))
			}
		}
		slope := linSlope(xs, ys)
		maxThr := 0.0
		for _, s := range r.Sweep {
			for _, v := range append(append([]float64(nil), s.ThrIdle...), s.ThrBusy...) {
				maxThr = max(maxThr, v)
			}
		}
		fmt.Fprintf(w, "%-58s %-10.0f %-10s\n", "server threads, idle and busy, every count <= 16", maxThr, mark(maxThr <= 16))
		fmt.Fprintf(w, "%-58s %-10s %-10s (least-squares slope of idle RSS after GC over N = %s)\n", "RSS per idle tenant <= 16 KiB", fmt.Sprintf("%.1f KiB", slope/1024), mark(slope <= 16<<10), joinI(xs))
		fmt.Fprintf(w, "%-58s %-10s %-10s (%s; made in-process, lo up; not nstarget's memory)\n", "kernel memory per namespace (reported, not ours)", fmt.Sprintf("%.0f KiB", r.KernelPerNS/1024), "", r.KernelDetail)
		fmt.Fprintln(w)
	}

	// 5. Bring-up.
	if len(r.Sweep) > 0 {
		fmt.Fprintf(w, "== bring-up: ms from exec of `nstarget serve` (volumes and namespaces present; every binary started once untimed before round 1)\n")
		fmt.Fprintf(w, "%7s | %12s %10s %7s %9s | %12s %12s %10s | %15s | %11s %10s %7s %9s | %s\n", "tenants", "first accept", "all accept", "window", "probe CPU", "log: 1st lsn", "last listen", "'serving'", "all SendTargets", "base: first", "base: all", "window", "probe CPU", "all accept per round (base)")
		for _, s := range r.Sweep {
			fmt.Fprintf(w, "%7d | %12s %10s %7s %9s | %12s %12s %10s | %15s | %11s %10s %7s %9s | %s (%s)\n", s.N, medS(s.FirstAcc), medS(s.AllAcc), medS(s.AllWin), medS(s.ProbeCPU), medS(s.LogFirst), medS(s.LogLast), medS(s.Serving), medS(s.Disc),
				medS(s.BaseFirstAcc), medS(s.BaseAllAcc), medS(s.BaseAllWin), medS(s.BaseProbeCPU), joinF(s.AllAcc, "%.0f"), joinF(s.BaseAllAcc, "%.0f"))
		}
		switch b.acceptMethod {
		case "sock_diag":
			fmt.Fprintf(w, "accepting = a TCP socket in LISTEN state for %s inside the tenant's namespace, seen by sock_diag (NETLINK_SOCK_DIAG inet_diag exact lookup on a netlink socket made in that namespace before exec); no connection is made\n", portal)
		default:
			fmt.Fprintf(w, "accepting = a TCP connect to %s from inside the tenant's namespace succeeded (-accept-method connect, or sock_diag did not work here); each is a connection the server accepts\n", portal)
		}
		fmt.Fprintf(w, "sweeps over the pending tenants (sock_diag lookups submitted through io_uring when it works: %v), a pause of max(%v, twice the prober's CPU time in the sweep) between two; window = how well the probes pin 'all accept' down (the last tenant began accepting after the latest negative probe of any tenant, and by the value shown); probe CPU = the prober thread's CPU time from exec to all accepting\n", b.ring != nil, probePause)
		fmt.Fprintf(w, "log columns: the server's own 'tenant listening' (first, last) and 'serving' lines, 1 ms resolution; since ac348ad the server reports every 'tenant listening' only once all its listeners exist\n")
		fmt.Fprintf(w, "all SendTargets: 4 workers, each one locked thread moving between the namespaces (fds opened before exec), 1 ms pause after a failed attempt, login + SendTargets + logout per tenant\n")
		for _, s := range r.Sweep {
			if len(s.OldAllAcc) > 0 {
				fmt.Fprintf(w, "%7d | the same binary under the earlier prober (a connect into every pending namespace, 0.5 ms between sweeps), alternating: first %s, all %s ms, probe CPU %s ms; per round %s\n",
					s.N, medS(s.OldFirstAcc), medS(s.OldAllAcc), medS(s.OldProbeCPU), joinF(s.OldAllAcc, "%.0f"))
			}
		}
		if b.baseNst != "" {
			fmt.Fprintf(w, "base = %s (same run, alternating starts)\n", b.baseNst)
		}
		if hi := r.Sweep[len(r.Sweep)-1]; len(hi.AllAcc) > 0 {
			v := median(hi.AllAcc)
			fmt.Fprintf(w, "%-58s %-10s %-10s\n", fmt.Sprintf("all %d tenants accepting within 150 ms of exec", hi.N), fmt.Sprintf("%.0f ms", v), mark(v <= 150))
		}
		fmt.Fprintln(w)
	}

	// 3. Fairness.
	if f := r.Fair; f != nil && len(f.Tenants) > 0 {
		fmt.Fprintf(w, "== fairness: tenant 1 writes 4K random QD128 (4 sessions x QD32); %d quiet tenants read 4K random QD4 (1 session each)\n", len(f.Tenants))
		fmt.Fprintf(w, "%-14s | %9s %9s %6s | %9s %9s %6s\n", "quiet tenant", "IOPS idle", "noisy", "ratio", "p99 idle", "noisy", "ratio")
		minR, maxP := 10.0, 0.0
		okI, okP := 0, 0
		var ratios, pr []float64
		for _, t := range f.Tenants {
			ri := median(t.NoisyIOPS) / median(t.IdleIOPS)
			rp := median(t.NoisyP99) / median(t.IdleP99)
			ratios, pr = append(ratios, ri), append(pr, rp)
			minR, maxP = min(minR, ri), max(maxP, rp)
			if ri >= 0.8 {
				okI++
			}
			if rp < 2 {
				okP++
			}
			fmt.Fprintf(w, "%-14s | %9.0f %9.0f %6.2f | %7.0fus %7.0fus %6.2f\n", t.Tenant, median(t.IdleIOPS), median(t.NoisyIOPS), ri, median(t.IdleP99), median(t.NoisyP99), rp)
		}
		fmt.Fprintf(w, "quiet tenants together: %.0f IOPS idle, %.0f with the noisy one; noisy tenant %.0f IOPS; server CPU %.0f%% idle-noisy, %.0f%% with it\n",
			median(f.IdleTotal), median(f.NoisyTotal), median(f.NoisyIOPS), median(f.CPUIdle), median(f.CPUNoisy))
		fmt.Fprintf(w, "%-58s %-10s %-10s (%d of %d meet it; median ratio %.2f)\n", "each quiet tenant keeps >= 80% of its idle IOPS", fmt.Sprintf("min %.2f", minR), mark(okI == len(f.Tenants)), okI, len(f.Tenants), median(ratios))
		fmt.Fprintf(w, "%-58s %-10s %-10s (%d of %d meet it; median ratio %.2f)\n", "each quiet tenant's p99 < 2x its idle p99", fmt.Sprintf("max %.2f", maxP), mark(okP == len(f.Tenants)), okP, len(f.Tenants), median(pr))
		if f.Profile != "" {
			fmt.Fprintf(w, "server CPU profile during a noisy run: %s\n", f.Profile)
		}
		if f.ProfileTop != "" {
			fmt.Fprintf(w, "%s\n", indent(f.ProfileTop))
		}
		fmt.Fprintln(w)
	}

	// 4. Churn.
	if c := r.ChurnBase; c != nil {
		printChurn(w, b, c, fmt.Sprintf(" (base = %s, run just before the one below)", b.baseNst))
	}
	if c := r.Churn; c != nil {
		printChurn(w, b, c, "")
	}
}

func printChurn(w io.Writer, b *bench, c *churnReport, which string) {
	fmt.Fprintf(w, "== churn under load: %.0f s; %d sessions 4K random read QD16 on %d tenants while namespaces of other tenants are deleted and re-created, and tenants are added/removed by `nstarget reload`%s\n", c.Seconds, b.active, b.active, which)
	fmt.Fprintf(w, "%-58s %-10d %-10s (errors %d, async messages %d, first %q)\n", "I/O errors and lost sessions on the running sessions = 0", c.IO.Errors+uint64(c.IO.Asyncs), mark(c.IO.Errors == 0 && c.IO.Asyncs == 0 && c.IO.Err == ""), c.IO.Errors, c.IO.Asyncs, c.IO.Err)
	fmt.Fprintf(w, "%-58s %-10d %-10s (server 'login' lines over the whole phase; the load client never reconnects)\n", fmt.Sprintf("logins = the %d initial ones (no reconnect)", b.active), c.Logins, mark(c.Logins == b.active))
	fmt.Fprintf(w, "%-58s %-10s %-10s (%d re-created, each probed until accepting)\n", "every re-created tenant serves again", fmt.Sprintf("%d/%d", c.Verified, c.Verified+c.VerifyFailed), mark(c.VerifyFailed == 0 && c.Recreated > 0), c.Recreated)
	fmt.Fprintf(w, "%-58s %-10s %-10s (p50 %.2f ms, max %.2f ms; accepting = LISTEN state seen by sock_diag, looked at every 0.2 ms)\n", "bind mount -> accepting, p99 (goal 20 ms)", fmt.Sprintf("%.2f ms", c.P99), mark(c.P99 <= 20), c.P50, c.Max)
	fmt.Fprintf(w, "%-58s %-10s %-10s (p50 %.2f ms, max %.2f ms; the earlier prober: a connect from inside the namespace in a tight loop, timed after the line above)\n", "bind mount -> a connect gets in, p99", fmt.Sprintf("%.2f ms", c.ConnP99), "", c.ConnP50, c.ConnMax)
	fmt.Fprintf(w, "%-58s %-10s %-10s\n", "reloads (add/remove tenants) during the phase", fmt.Sprintf("%d", c.Reloads), mark(c.ReloadFails == 0))
	fmt.Fprintf(w, "I/O during churn: %.0f IOPS, p50 %.0f us, p99 %.0f us, server CPU %.0f%%\n", c.IO.IOPS, c.IO.P50, c.IO.P99, c.IO.ServerCPU)
	fmt.Fprintf(w, "server before -> after (after GC): fds %d -> %d, threads %d -> %d, RSS %.1f -> %.1f MiB\n",
		c.Before.FDs, c.After.FDs, c.Before.Threads, c.After.Threads, float64(c.Before.RSS)/(1<<20), float64(c.After.RSS)/(1<<20))
	fmt.Fprintln(w)
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

func trunc(v float64) string { return fmt.Sprintf("%.3fx", float64(int(v*1000))/1000) }

func medS(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", median(v))
}

func joinF(v []float64, f string) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf(f, x))
	}
	return strings.Join(s, "/")
}

func joinI(v []float64) string { return joinF(v, "%.0f") }

func linSlope(xs, ys []float64) float64 {
	n := float64(len(xs))
	if n < 2 {
		return 0
	}
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	d := n*sxx - sx*sx
	if d == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / d
}

// plot writes the SVGs and returns their paths.
func (r *report) plot(b *bench) []string {
	var rows []*sweepRow
	for _, s := range r.Sweep {
		rows = append(rows, s)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].N < rows[j].N })
	series := func(name string, get func(*sweepRow) []float64, scale float64) svgplot.Series {
		ps := svgplot.Series{Name: name}
		for _, s := range rows {
			if v := get(s); len(v) > 0 {
				ps.X = append(ps.X, float64(s.N))
				ps.Y = append(ps.Y, median(v)*scale)
			}
		}
		return ps
	}
	var files []string
	write := func(name string, p svgplot.Plot) {
		n := 0
		for _, s := range p.Series {
			n += len(s.X)
		}
		if n == 0 {
			return
		}
		path := filepath.Join(b.plots, name)
		if err := p.Write(path); err != nil {
			b.logf("plot %s: %v", path, err)
			return
		}
		files = append(files, path)
	}
	write("throughput-vs-tenants.svg", svgplot.Plot{Title: "Aggregate throughput of 16 sessions vs configured tenants", YLabel: "4K IOPS (x1000) / 1M MiB/s (x100)",
		Series: []svgplot.Series{series("4K random read QD16, kIOPS", func(s *sweepRow) []float64 { return s.IOPS4k }, 1e-3), series("1M sequential read QD4, 100 MiB/s", func(s *sweepRow) []float64 { return s.MiB1m }, 1e-2)}})
	write("p99-vs-tenants.svg", svgplot.Plot{Title: "p99 command latency vs configured tenants", YLabel: "ms",
		Series: []svgplot.Series{series("4K random read QD16", func(s *sweepRow) []float64 { return s.P99_4k }, 1e-3), series("1M sequential read QD4", func(s *sweepRow) []float64 { return s.P99_1m }, 1e-3)}})
	write("threads-rss-vs-tenants.svg", svgplot.Plot{Title: "Server threads and RSS vs configured tenants", YLabel: "threads / MiB",
		Series: []svgplot.Series{series("threads idle", func(s *sweepRow) []float64 { return s.ThrIdle }, 1), series("threads busy", func(s *sweepRow) []float64 { return s.ThrBusy }, 1),
			series("RSS idle after GC, MiB", func(s *sweepRow) []float64 { return s.RSSIdle }, 1.0/(1<<20)), series("RSS busy, MiB", func(s *sweepRow) []float64 { return s.RSSBusy }, 1.0/(1<<20))}})
	write("bringup-vs-tenants.svg", svgplot.Plot{Title: "Bring-up: ms from exec of nstarget serve", YLabel: "ms", Goal: 150, GoalName: "goal: all accepting <= 150 ms",
		Series: []svgplot.Series{series("first tenant accepting", func(s *sweepRow) []float64 { return s.FirstAcc }, 1), series("all tenants accepting", func(s *sweepRow) []float64 { return s.AllAcc }, 1),
			series("all tenants answered SendTargets", func(s *sweepRow) []float64 { return s.Disc }, 1),
			series("base binary: all accepting", func(s *sweepRow) []float64 { return s.BaseAllAcc }, 1)}})
	return files
}
