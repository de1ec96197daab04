package conf

import (
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"
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

// statement skips blank lines and comments up to the next statement (a table header or a
// key/value line) and reports whether there is one.
func (sc *scanner) statement() bool {
	for {
		sc.skipBlank()
		switch {
		case sc.eof():
			return false
		case sc.peek() == '\n' || sc.peek() == '\r':
			sc.next()
		case sc.peek() == '#':
			sc.skipLine()
		default:
			return true
		}
	}
}

// header consumes the opening bracket(s) of a table header and reports whether it is that of
// an array of tables ("[[").
func (sc *scanner) header() (array bool) {
	array = sc.has("[[")
	sc.i++
	if array {
		sc.i++
	}
	return array
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
	for sc.statement() {
		if sc.peek() == '[' {
			line := sc.line
			array := sc.header()
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

// Portal is one tenant's listen address as a file gives it: the namespace (file name under
// netns_dir) and the ip:port inside it.
type Portal struct{ Netns, Addr string }

// PeekPortals reads, without decoding or validating the file, where its tenants listen: the
// absolute netns_dir and each [[tenant]]'s namespace and portal, with Parse's defaults. It
// exists so that a server can bring its listeners up while the file is still being parsed
// (a 1024-tenant file takes tens of ms to decode; its listeners as long again); what it returns
// is a guess that the caller must reconcile with Parse's result, which is the truth, and throw
// away if Parse fails. ok is false, and nothing should be started early, when the file holds
// anything it does not read with certainty: a table other than [server] and [[tenant]] (and
// their sub-tables; a [cluster] file's tenants are the cluster's to place), a key outside a
// table, or one of these keys with a value that is not a plain one-line string. A tenant whose
// namespace or portal would not pass Parse is left out.
func PeekPortals(file string, data []byte) (netnsDir string, portals []Portal, ok bool) {
	// The scan only reads data, and the strings it keeps are cloned: no copy of the whole file.
	sc := &scanner{s: unsafe.String(unsafe.SliceData(data), len(data)), line: 1}
	dir := ""
	type tenant struct {
		name, netns, portal          string
		nameSet, netnsSet, portalSet bool
	}
	var tenants []tenant
	section := "" // "server", "tenant" (the last [[tenant]] itself) or "other" (their sub-tables)
	for sc.statement() {
		if sc.peek() == '[' {
			array := sc.header()
			parts := sc.key()
			if !sc.eof() && sc.peek() == ']' {
				sc.i++
				if array && (sc.eof() || sc.peek() != ']') {
					return "", nil, false
				}
			}
			switch {
			case len(parts) == 0:
				return "", nil, false
			case array && len(parts) == 1 && parts[0] == "tenant":
				tenants = append(tenants, tenant{})
				section = "tenant"
			case parts[0] == "tenant" && len(parts) > 1 && len(tenants) > 0:
				section = "other"
			case !array && parts[0] == "server":
				section = "other"
				if len(parts) == 1 {
					section = "server"
				}
			default:
				return "", nil, false
			}
			sc.skipLine()
			continue
		}
		if section == "" {
			return "", nil, false
		}
		if section == "other" {
			// Nothing to keep: look past the statement without building its key.
			sc.skipKey()
			sc.skipBlank()
			if sc.eof() || sc.peek() != '=' {
				return "", nil, false
			}
			sc.i++
			sc.skipValue()
			continue
		}
		parts := sc.key()
		sc.skipBlank()
		if len(parts) == 0 || sc.eof() || sc.peek() != '=' {
			return "", nil, false
		}
		sc.i++
		sc.skipBlank()
		var dst *string
		var set *bool
		switch {
		case section == "server" && parts[0] == "netns_dir":
			dst = &dir
		case section == "tenant" && parts[0] == "name":
			t := &tenants[len(tenants)-1]
			dst, set = &t.name, &t.nameSet
		case section == "tenant" && parts[0] == "netns":
			t := &tenants[len(tenants)-1]
			dst, set = &t.netns, &t.netnsSet
		case section == "tenant" && parts[0] == "portal":
			t := &tenants[len(tenants)-1]
			dst, set = &t.portal, &t.portalSet
		default:
			sc.skipValue()
			continue
		}
		s, ok := sc.plainString()
		if !ok || len(parts) != 1 {
			return "", nil, false
		}
		*dst = strings.Clone(s)
		if set != nil {
			*set = true
		}
	}
	if dir == "" {
		dir = DefaultNetnsDir
	} else if !filepath.IsAbs(dir) {
		// As Parse anchors it: relative to the file's directory.
		abs, err := filepath.Abs(filepath.Join(filepath.Dir(file), dir))
		if err != nil {
			return "", nil, false
		}
		dir = abs
	}
	portals = make([]Portal, 0, len(tenants))
	for _, t := range tenants {
		netns := t.name
		if t.netnsSet {
			netns = t.netns
		}
		portal := DefaultPortal
		if t.portalSet {
			portal = t.portal
		}
		if !t.nameSet || checkFileName("netns", netns) != nil || CheckPortal(portal) != nil {
			continue // Parse refuses it
		}
		portals = append(portals, Portal{Netns: netns, Addr: portal})
	}
	return filepath.Clean(dir), portals, true
}

// plainString reads a one-line string value without escapes ("..." or '...') and what may
// follow it on its line (blanks, a comment); ok is false for anything else.
func (sc *scanner) plainString() (string, bool) {
	if sc.eof() || (sc.peek() != '"' && sc.peek() != '\'') || sc.has(`"""`) || sc.has(`'''`) {
		return "", false
	}
	q := sc.next()
	start := sc.i
	for !sc.eof() && sc.peek() != q {
		if c := sc.peek(); c == '\\' || c == '\n' || c == '\r' || c < 0x20 && c != '\t' || c == 0x7f {
			return "", false
		}
		sc.i++
	}
	if sc.eof() {
		return "", false
	}
	s := sc.s[start:sc.i]
	sc.i++
	sc.skipBlank()
	if !sc.eof() && sc.peek() != '\n' && sc.peek() != '\r' && sc.peek() != '#' {
		return "", false
	}
	sc.skipLine()
	return s, true
}
