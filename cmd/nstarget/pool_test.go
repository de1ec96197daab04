package main

import "testing"

func TestPoolThresholdWarnsOncePerCrossingWithHysteresis(t *testing.T) {
	w := poolWatch{threshold: 80}
	steps := []struct {
		used             float64
		crossed, cleared bool
	}{
		{50, false, false},
		{80, true, false}, // at the line counts
		{95, false, false},
		{79, false, false}, // hovering just under: still "above", no second warning
		{81, false, false},
		{74, false, true}, // 5 points below: re-armed
		{76, false, false},
		{85, true, false},
	}
	for i, s := range steps {
		crossed, cleared := w.observe(s.used)
		if crossed != s.crossed || cleared != s.cleared {
			t.Fatalf("step %d (%.0f%%): crossed %v cleared %v, want %v %v", i, s.used, crossed, cleared, s.crossed, s.cleared)
		}
	}
	off := poolWatch{}
	if c, _ := off.observe(100); c {
		t.Fatal("a threshold of 0 warned")
	}
}
