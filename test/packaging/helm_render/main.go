// Command helm_render renders a Helm chart's templates the way `helm template` does, for tests
// on machines without Helm.
//
// It uses the same engine as Helm 3: Go's text/template with the Sprig v3 function library,
// plus Helm's own functions include, required, tpl, toYaml, fromYaml and toJson. It does not
// handle subcharts, .Files, lookup or .Capabilities beyond a fixed Kubernetes version, which
// the taser chart does not use. Missing keys are errors, as with `helm template --strict`.
//
// Usage: helm_render CHART_DIR RELEASE NAMESPACE [VALUES_FILE...]
//
// Prints every rendered manifest as a YAML document headed by "# Source: CHART/templates/FILE",
// and NOTES.txt last, headed by "# Notes".
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig/v3"
	"sigs.k8s.io/yaml"
)

type chartMeta struct {
	APIVersion  string `json:"apiVersion"`
	Name        string `json:"name"`
	Version     string `json:"version"`
	AppVersion  string `json:"appVersion"`
	Description string `json:"description"`
	Type        string `json:"type"`
}

func readYAMLMap(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	values := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &values); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return values, nil
}

// mergeValues merges override into base as Helm merges -f files: maps merge key by key, any
// other value replaces the base value, and a null removes the key.
func mergeValues(base, override map[string]interface{}) map[string]interface{} {
	for key, value := range override {
		if value == nil {
			delete(base, key)
			continue
		}
		overrideMap, overrideIsMap := value.(map[string]interface{})
		baseMap, baseIsMap := base[key].(map[string]interface{})
		if overrideIsMap && baseIsMap {
			base[key] = mergeValues(baseMap, overrideMap)
		} else {
			base[key] = value
		}
	}
	return base
}

func toYAML(value interface{}) string {
	data, err := yaml.Marshal(value)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(data), "\n")
}

func fromYAML(text string) map[string]interface{} {
	result := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(text), &result); err != nil {
		result["Error"] = err.Error()
	}
	return result
}

func toJSON(value interface{}) string {
	data, err := json.Marshal(value)
	if err != nil {
		return ""
	}
	return string(data)
}

func render(chartDir, release, namespace string, valueFiles []string) (string, error) {
	chartYAML, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	var chart chartMeta
	if err := yaml.Unmarshal(chartYAML, &chart); err != nil {
		return "", fmt.Errorf("Chart.yaml: %w", err)
	}
	values, err := readYAMLMap(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, file := range valueFiles {
		override, err := readYAMLMap(file)
		if err != nil {
			return "", err
		}
		values = mergeValues(values, override)
	}

	// The same top-level objects as Helm's, with the field names Helm exposes.
	top := map[string]interface{}{
		"Values": values,
		"Chart": map[string]interface{}{
			"Name": chart.Name, "Version": chart.Version, "AppVersion": chart.AppVersion,
			"Description": chart.Description, "Type": chart.Type, "APIVersion": chart.APIVersion,
		},
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": "v1.29.0", "Major": "1", "Minor": "29"},
		},
		"Template": map[string]interface{}{"BasePath": chart.Name + "/templates"},
	}

	root := template.New("root").Option("missingkey=error")
	funcs := sprig.TxtFuncMap()
	// Helm's engine (pkg/engine/funcs.go) removes these two, which read the environment.
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = fromYAML
	funcs["toJson"] = toJSON
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buffer bytes.Buffer
		if err := root.ExecuteTemplate(&buffer, name, data); err != nil {
			return "", err
		}
		return buffer.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		clone, err := root.Clone()
		if err != nil {
			return "", err
		}
		parsed, err := clone.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buffer bytes.Buffer
		if err := parsed.Execute(&buffer, data); err != nil {
			return "", err
		}
		return buffer.String(), nil
	}
	funcs["required"] = func(message string, value interface{}) (interface{}, error) {
		if value == nil {
			return nil, fmt.Errorf("%s", message)
		}
		if text, ok := value.(string); ok && text == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return value, nil
	}
	root.Funcs(funcs)

	templateDir := filepath.Join(chartDir, "templates")
	entries, err := os.ReadDir(templateDir)
	if err != nil {
		return "", err
	}
	var names []string
	for _, entry := range entries {
		if entry.IsDir() {
			continue
		}
		name := chart.Name + "/templates/" + entry.Name()
		text, err := os.ReadFile(filepath.Join(templateDir, entry.Name()))
		if err != nil {
			return "", err
		}
		if _, err := root.New(name).Parse(string(text)); err != nil {
			return "", err
		}
		names = append(names, name)
	}
	sort.Strings(names)

	var output strings.Builder
	notes := ""
	for _, name := range names {
		base := filepath.Base(name)
		// Helm renders files whose names start with '_' only through include.
		if strings.HasPrefix(base, "_") {
			continue
		}
		var buffer bytes.Buffer
		if err := root.ExecuteTemplate(&buffer, name, top); err != nil {
			return "", err
		}
		text := strings.ReplaceAll(buffer.String(), "<no value>", "")
		if base == "NOTES.txt" {
			notes = text
			continue
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&output, "---\n# Source: %s\n%s\n", name, strings.TrimSpace(text))
	}
	fmt.Fprintf(&output, "# Notes\n%s\n", notes)
	return output.String(), nil
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: helm_render CHART_DIR RELEASE NAMESPACE [VALUES_FILE...]")
		os.Exit(2)
	}
	text, err := render(os.Args[1], os.Args[2], os.Args[3], os.Args[4:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "helm_render: %v\n", err)
		os.Exit(1)
	}
	fmt.Print(text)
}
