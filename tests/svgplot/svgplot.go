// Package svgplot writes the benchmarks' plots: a tiny SVG 1.1 line-plot writer (log2 x axis
// for tenant counts, linear y axis from 0, one polyline with markers per series, an optional
// horizontal goal line, a legend), so plotting needs no dependency. Benchmarks only.
package svgplot

import (
	"fmt"
	"html"
	"math"
	"os"
	"strings"
)

// Series is one line of a plot.
type Series struct {
	Name string
	X, Y []float64
}

// Plot is one chart: its series share the axes.
type Plot struct {
	Title, YLabel string
	Series        []Series
	Goal          float64
	GoalName      string
}

var plotColors = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"}

func niceStep(span float64) float64 {
	if span <= 0 {
		return 1
	}
	raw := span / 5
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

// Write writes the plot to path as SVG.
func (p Plot) Write(path string) error {
	const W, H = 760, 480
	const L, R, T, B = 70, 20, 40, 150 // margins; the legend goes below the axes
	xmin, xmax := math.Inf(1), math.Inf(-1)
	ymax := p.Goal
	for _, s := range p.Series {
		for i := range s.X {
			xmin, xmax = min(xmin, s.X[i]), max(xmax, s.X[i])
			ymax = max(ymax, s.Y[i])
		}
	}
	if xmin == xmax {
		xmin, xmax = xmin/2, xmax*2
	}
	if ymax <= 0 {
		ymax = 1
	}
	step := niceStep(ymax * 1.1)
	ytop := math.Ceil(ymax*1.1/step) * step
	lx0, lx1 := math.Log2(xmin), math.Log2(xmax)
	px := func(x float64) float64 { return L + (math.Log2(x)-lx0)/(lx1-lx0)*(W-L-R) }
	py := func(y float64) float64 { return H - B - y/ytop*(H-T-B) }
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&sb, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&sb, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", L, html.EscapeString(p.Title))
	// Grid and y ticks.
	for y := 0.0; y <= ytop+step/2; y += step {
		fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", L, W-R, py(y), py(y))
		fmt.Fprintf(&sb, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", L-6, py(y)+4, fmtTick(y))
	}
	// x ticks at the data's x values.
	seen := map[float64]bool{}
	for _, s := range p.Series {
		for _, x := range s.X {
			if seen[x] {
				continue
			}
			seen[x] = true
			fmt.Fprintf(&sb, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#ddd"/>`+"\n", px(x), px(x), T, H-B)
			fmt.Fprintf(&sb, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", px(x), H-B+16, fmtTick(x))
		}
	}
	fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="black"/>`+"\n", L, W-R, H-B, H-B)
	fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="black"/>`+"\n", L, L, T, H-B)
	fmt.Fprintf(&sb, `<text x="%d" y="%d" text-anchor="middle">configured tenants (log scale)</text>`+"\n", (L+W-R)/2, H-B+34)
	fmt.Fprintf(&sb, `<text transform="translate(16 %d) rotate(-90)" text-anchor="middle">%s</text>`+"\n", (T+H-B)/2, html.EscapeString(p.YLabel))
	ly := H - B + 56
	if p.Goal > 0 {
		fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#888" stroke-dasharray="6 4"/>`+"\n", L, W-R, py(p.Goal), py(p.Goal))
		fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#888" stroke-dasharray="6 4"/><text x="%d" y="%d">%s</text>`+"\n", L, L+24, ly-4, ly-4, L+30, ly, html.EscapeString(p.GoalName))
		ly += 16
	}
	for i, s := range p.Series {
		c := plotColors[i%len(plotColors)]
		var pts []string
		for k := range s.X {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s.X[k]), py(s.Y[k])))
		}
		fmt.Fprintf(&sb, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", c, strings.Join(pts, " "))
		for k := range s.X {
			fmt.Fprintf(&sb, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s: %s tenants, %s</title></circle>`+"\n", px(s.X[k]), py(s.Y[k]), c, html.EscapeString(s.Name), fmtTick(s.X[k]), fmtTick(s.Y[k]))
		}
		fmt.Fprintf(&sb, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2"/><text x="%d" y="%d">%s</text>`+"\n", L, L+24, ly-4, ly-4, c, L+30, ly, html.EscapeString(s.Name))
		ly += 16
	}
	sb.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(sb.String()), 0o644)
}

func fmtTick(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e9 {
		return fmt.Sprintf("%.0f", v)
	}
	if math.Abs(v) >= 10 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2g", v)
}
