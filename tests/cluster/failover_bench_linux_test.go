package cluster_test

import (
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"nstarget/tests/svgplot"
)

// BenchmarkFailover is the time from killing the node that owns some of N tenants (1, 100,
// 300; two nodes, 2 s lease) to every one of them serving again on the other node: listening
// on its own address, its image fenced and open. Reported as s-to-serve (lease expiry
// included) and s-after-expiry (what is left once the 2 s lease has run out), per tenant moved.
// It also plots s-to-serve against the tenants configured to bench/results/.
func BenchmarkFailover(b *testing.B) {
	total := svgplot.Series{Name: "kill to every moved tenant serving (2 s lease included)"}
	after := svgplot.Series{Name: "after the 2 s lease"}
	for _, n := range []int{1, 100, 300} {
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			var took time.Duration
			var moved int
			for b.Loop() {
				took, moved = failoverOnce(b, n)
			}
			b.ReportMetric(took.Seconds(), "s-to-serve")
			b.ReportMetric((took - 2*time.Second).Seconds(), "s-after-expiry")
			b.ReportMetric(float64(moved), "tenants-moved")
			total.X, total.Y = append(total.X, float64(n)), append(total.Y, took.Seconds())
			after.X, after.Y = append(after.X, float64(n)), append(after.Y, max(0, (took-2*time.Second).Seconds()))
		})
	}
	p := svgplot.Plot{Title: "Failover: a node SIGKILLed, two nodes, half the tenants move", YLabel: "seconds",
		Series: []svgplot.Series{total, after}, Goal: 2, GoalName: "goal: 2 s after the lease"}
	if err := p.Write("../../bench/results/failover-vs-tenants.svg"); err != nil {
		b.Log(err)
	}
}

func failoverOnce(b *testing.B, n int) (time.Duration, int) {
	dir := b.TempDir()
	sockDir, err := os.MkdirTemp("", "nc")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sw := makeSwitch(b)
	k := seq.Add(1)
	keys := fmt.Sprintf("/%s-%d", prefix, k)
	na := newNode(b, dir, sockDir, keys, "na", fmt.Sprintf("%su%da", prefix, k))
	nb := newNode(b, dir, sockDir, keys, "nb", fmt.Sprintf("%su%db", prefix, k))
	uplink(b, sw, na.up)
	uplink(b, sw, nb.up)
	na.start()
	nb.start()
	doc := dir + "/tenants.toml"
	if err := os.WriteFile(doc, []byte(tenantsDoc(n)), 0o600); err != nil {
		b.Fatal(err)
	}
	run(b, bin, "cluster", "apply", "-c", doc, "-endpoints", etcd.URL, "-prefix", keys)
	var victims []string
	waitFor(b, "every tenant served", func() error {
		own, settled := owners(b, keys)
		if !settled {
			return fmt.Errorf("not settled")
		}
		victims = victims[:0]
		for tn, o := range own {
			node := map[string]*node{"na": na, "nb": nb}[o]
			if node.count("tenant listening", tn) == 0 {
				return fmt.Errorf("%s not listening on %s", tn, o)
			}
			if o == "na" {
				victims = append(victims, tn)
			}
		}
		return nil
	})
	victim, survivor := na, nb
	if len(victims) == 0 { // everything on nb: kill it instead
		victim, survivor = nb, na
		for i := range n {
			victims = append(victims, fmt.Sprintf("t%d", i))
		}
	}
	// A survivor may have served a victim before placement settled: count only what follows.
	before := map[string]int{}
	for _, tn := range victims {
		before[tn] = survivor.count("tenant listening", tn)
	}
	t0 := time.Now()
	victim.signal(syscall.SIGKILL)
	<-victim.done
	run(b, "ip", "link", "set", victim.up, "down") // the machine is gone, its links with it
	waitFor(b, "every tenant of the killed node served again", func() error {
		for _, tn := range victims {
			if survivor.count("tenant listening", tn) == before[tn] {
				return fmt.Errorf("%s not yet", tn)
			}
		}
		return nil
	})
	took := time.Since(t0)
	survivor.stop()
	return took, len(victims)
}
