package conf

import (
	"strconv"
	"strings"
)

// positions maps an indexed key path ("tenant[1].target[0].iqn") to the 1-based line it is
// defined on. BurntSushi/toml keeps key positions unexported and keyed without array indexes
// (the last [[tenant]] wins), so a light lexer walks the file once: it only needs to find where
// statements start, which means skipping strings, comments and bracketed values correctly.
type positions map[string]int

// line returns the line of path, or of its nearest ancestor that has one (an inline table or
// array has no lines of its own for its elements), or 0.
func (p positions) line(path string) int {
	for path != "" {
		if l, ok := p[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			return 0
		}
		path = path[:i]
	}
	return 0
}

type scanner struct {
	s    string
	i    int
	line int
}

func (sc *scanner) eof() bool  { return sc.i >= len(sc.s) }
func (sc *scanner) peek() byte { return sc.s[sc.i] }
func (sc *scanner) next() byte {
	c := sc.s[sc.i]
	sc.i++
	if c == '\n' {
		sc.line++
	}
	return c
}
func (sc *scanner) has(prefix string) bool { return strings.HasPrefix(sc.s[sc.i:], prefix) }

func (sc *scanner) skipBlank() {
	for !sc.eof() && (sc.peek() == ' ' || sc.peek() == '\t') {
		sc.i++
	}
}

func (sc *scanner) skipLine() {
	for !sc.eof() && sc.peek() != '\n' {
		sc.i++
	}
}

// key reads a dotted key (bare or quoted parts) and stops before '=' or ']'.
func (sc *scanner) key() []string {
	var parts []string
	for {
		sc.skipBlank()
		if sc.eof() {
			return parts
		}
		switch c := sc.peek(); c {
		case '"', '\'':
			sc.i++
			var b strings.Builder
			for !sc.eof() && sc.peek() != c && sc.peek() != '\n' {
				ch := sc.next()
				if c == '"' && ch == '\\' && !sc.eof() {
					// Enough for positions: keep the escaped byte, do not decode \uXXXX.
					ch = sc.next()
				}
				b.WriteByte(ch)
			}
			if !sc.eof() && sc.peek() == c {
				sc.i++
			}
			parts = append(parts, b.String())
		default:
			start := sc.i
			for !sc.eof() && strings.IndexByte(" \t.=]\n#", sc.peek()) < 0 {
				sc.i++
			}
			if sc.i == start {
				return parts
			}
			parts = append(parts, sc.s[start:sc.i])
		}
		sc.skipBlank()
		if sc.eof() || sc.peek() != '.' {
			return parts
		}
		sc.i++
	}
}

// skipKey moves past a dotted key exactly as key does, without building its parts.
func (sc *scanner) skipKey() {
	for {
		sc.skipBlank()
		if sc.eof() {
			return
		}
		switch c := sc.peek(); c {
		case '"', '\'':
			sc.i++
			for !sc.eof() && sc.peek() != c && sc.peek() != '\n' {
				ch := sc.next()
				if c == '"' && ch == '\\' && !sc.eof() {
					sc.next()
				}
			}
			if !sc.eof() && sc.peek() == c {
				sc.i++
			}
		default:
			start := sc.i
			for !sc.eof() && strings.IndexByte(" \t.=]\n#", sc.peek()) < 0 {
				sc.i++
			}
			if sc.i == start {
				return
			}
		}
		sc.skipBlank()
		if sc.eof() || sc.peek() != '.' {
			return
		}
		sc.i++
	}
}

// skipValue moves past one value, including multi-line strings, arrays and inline tables.
func (sc *scanner) skipValue() {
	depth := 0
	for !sc.eof() {
		switch {
		case sc.has(`"""`), sc.has(`'''`):
			q := sc.s[sc.i : sc.i+3]
			sc.i += 3
			for !sc.eof() && !sc.has(q) {
				if q == `"""` && sc.peek() == '\\' {
					sc.next()
					if sc.eof() {
						return
					}
				}
				sc.next()
			}
			// A closing delimiter may be followed by up to two more quotes that belong to the string.
			for n := 0; n < 5 && !sc.eof() && sc.peek() == q[0]; n++ {
				sc.i++
			}
			continue
		case sc.peek() == '"' || sc.peek() == '\'':
			q := sc.next()
			for !sc.eof() && sc.peek() != q && sc.peek() != '\n' {
				if q == '"' && sc.peek() == '\\' {
					sc.i++
					if sc.eof() {
						return
					}
				}
				sc.i++
			}
			if !sc.eof() && sc.peek() == q {
				sc.i++
			}
			continue
		case sc.peek() == '#':
			sc.skipLine()
			continue
		case sc.peek() == '[' || sc.peek() == '{':
			depth++
		case sc.peek() == ']' || sc.peek() == '}':
			depth--
		case sc.peek() == '\n':
			if depth <= 0 {
				return
			}
		}
		sc.next()
	}
}

// scanPositions records the line of every table header and key/value statement of a TOML
// document. It never fails: on input it does not understand it records less, and line falls
// back to an ancestor.
func scanPositions(doc string) positions { return scan(doc, true) }

// scanLines is the cheap scan a valid file needs: it records every table header, every key of
// a table that is not an element of an array of tables ([server], [cluster], ...), and every key
// whose value is an inline table or array, but not the scalar keys inside [[tenant]] and its
// sub-tables, which only an error message ever asks for (those come from scanPositions, run
// when the first finding is reported). For every header path and every recorded key, line
// gives what it gives on scanPositions' map: a scalar key is never the ancestor of another
// path.
func scanLines(doc string) positions { return scan(doc, false) }

func scan(doc string, all bool) positions {
	pos := make(positions, 64)
	if all {
		pos = make(positions, strings.Count(doc, "\n")+1)
	}
	counts := map[string]int{} // indexed array-of-tables path -> elements seen
	var table []string         // indexed path of the current table, one element per key part
	tablePath := ""            // strings.Join(table, ".")
	inArray := false           // the current table is (inside) an element of an array of tables
	// resolve turns a plain dotted key into an indexed path, following arrays of tables to their
	// last element.
	resolve := func(parts []string, upTo int) []string {
		out := make([]string, 0, len(parts))
		for i, p := range parts[:upTo] {
			seg := p
			prefix := strings.Join(append(out[:i:i], seg), ".")
			if n, ok := counts[prefix]; ok {
				seg = p + "[" + strconv.Itoa(n-1) + "]"
			}
			out = append(out, seg)
		}
		return out
	}
	sc := &scanner{s: doc, line: 1}
	for !sc.eof() {
		sc.skipBlank()
		if sc.eof() {
			break
		}
		switch sc.peek() {
		case '\n', '\r':
			sc.next()
			continue
		case '#':
			sc.skipLine()
			continue
		case '[':
			line := sc.line
			array := sc.has("[[")
			if array {
				sc.i += 2
			} else {
				sc.i++
			}
			parts := sc.key()
			if len(parts) == 0 {
				sc.skipLine()
				continue
			}
			idx := resolve(parts, len(parts)-1)
			last := parts[len(parts)-1]
			if array {
				key := strings.Join(append(idx, last), ".")
				counts[key]++
				last += "[" + strconv.Itoa(counts[key]-1) + "]"
			}
			table = append(idx, last)
			tablePath = strings.Join(table, ".")
			inArray = strings.IndexByte(tablePath, '[') >= 0
			pos[tablePath] = line
			sc.skipLine()
			continue
		}
		line := sc.line
		if !all && inArray {
			// Look past the key without building it; only an inline table or array is kept.
			start, startLine := sc.i, sc.line
			sc.skipKey()
			sc.skipBlank()
			if sc.eof() || sc.peek() != '=' {
				sc.skipLine()
				continue
			}
			sc.i++
			sc.skipBlank()
			if sc.eof() || (sc.peek() != '[' && sc.peek() != '{') {
				sc.skipValue()
				continue
			}
			sc.i, sc.line = start, startLine
		}
		parts := sc.key()
		if len(parts) > 0 {
			path := strings.Join(parts, ".")
			if tablePath != "" {
				path = tablePath + "." + path
			}
			if _, dup := pos[path]; !dup {
				pos[path] = line
			}
		}
		sc.skipBlank()
		if !sc.eof() && sc.peek() == '=' {
			sc.i++
			sc.skipValue()
		} else {
			sc.skipLine()
		}
	}
	return pos
}
