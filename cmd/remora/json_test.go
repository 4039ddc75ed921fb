package main

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/agent/api"
)

// The JSON the CLI prints (vm status --json, arbiter status --json) has one
// vocabulary: a duration's key says its unit (_ns), the guest is "guest".
func TestStatusJSONVocabulary(t *testing.T) {
	durType := reflect.TypeOf(time.Duration(0))
	seen := map[reflect.Type]bool{}
	var walk func(path string, ty reflect.Type)
	walk = func(path string, ty reflect.Type) {
		for ty.Kind() == reflect.Pointer || ty.Kind() == reflect.Slice || ty.Kind() == reflect.Map {
			ty = ty.Elem()
		}
		if ty.Kind() != reflect.Struct || seen[ty] {
			return
		}
		seen[ty] = true
		for i := range ty.NumField() {
			f := ty.Field(i)
			key, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if key == "-" || !f.IsExported() {
				continue
			}
			if key == "" {
				key = f.Name
			}
			if f.Type == durType && !strings.HasSuffix(key, "_ns") {
				t.Errorf("%s.%s: duration key %q does not say its unit (want %s_ns)", path, f.Name, key, key)
			}
			if key == "name" && strings.Contains(strings.ToLower(ty.Name()), "guest") {
				t.Errorf("%s.%s: a guest's name is \"guest\"", path, f.Name)
			}
			walk(path+"."+f.Name, f.Type)
		}
	}
	walk("api.VMStatus", reflect.TypeOf(api.VMStatus{}))
	walk("arbiter.Status", reflect.TypeOf(arbiter.Status{}))
	if len(seen) < 4 {
		t.Fatalf("walked only %d types", len(seen))
	}
}
