package conf

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParse: no input may panic the parser or its position scanners, every rejection is a
// located finding naming the file, and an accepted file's lines are those of the full scan.
func FuzzParse(f *testing.F) {
	f.Add(strings.Join(base(), "\n"))
	f.Add("[server]\ndata_dir = '''\nx\n'''\n[[tenant]]\nname = \"a\" # c\n")
	f.Add("a.\"b.c\" = { x = [1, [2, {y = \"]\"}]] }\r\n[[ tenant ]]\n")
	f.Add("x = \"\"\"\\\"\"\"\"\n[t.'u'.v]\n")
	f.Fuzz(func(t *testing.T, doc string) {
		cfg, err := Parse("f.toml", []byte(doc))
		if err == nil {
			if cfg == nil {
				t.Fatal("nil config without error")
			}
			checkLinesAgree(t, doc, cfg)
			return
		}
		var es Errors
		if !errors.As(err, &es) || len(es) == 0 {
			t.Fatalf("error %T is not located findings: %v", err, err)
		}
		for _, e := range es {
			if !strings.HasPrefix(e.Error(), "f.toml") {
				t.Fatalf("finding does not name the file: %v", e)
			}
		}
	})
}
