// Renders an Ollama Modelfile's TEMPLATE with Go's own text/template, the engine Ollama runs,
// for the conversations the Python test sends. Stdin: {"template": "...", "conversations":
// [[{"role": ..., "content": ...}, ...], ...]}. Stdout: a JSON list with one rendered prompt per
// conversation. A template that does not parse or execute exits 1 with Go's error on stderr.
//
// The template is parsed and run as Ollama's template package (template/template.go) does for a
// template that reads .Messages: option missingkey=zero, its "json" function, a map of values
// (System, Messages, Tools, Response, Think, ...), the messages collated first.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// Message has the fields of Ollama's api.Message that a template can read.
type Message struct {
	Role      string
	Content   string
	Thinking  string
	Images    []string
	ToolCalls []any
	ToolName  string
}

type request struct {
	Template      string `json:"template"`
	Conversations [][]struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"conversations"`
}

// collate is what Ollama does before it runs a template: every system message's content joined
// for .System, and consecutive messages of one role (tool messages apart) merged into one.
func collate(messages []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range messages {
		if messages[i].Role == "system" {
			system = append(system, messages[i].Content)
		}
		last := len(collated) - 1
		if last >= 0 && collated[last].Role == messages[i].Role && messages[i].Role != "tool" {
			collated[last].Content += "\n\n" + messages[i].Content
		} else {
			collated = append(collated, &messages[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail("reading the request: %v", err)
	}
	funcs := template.FuncMap{
		"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail("parsing the template: %v", err)
	}
	out := make([]string, 0, len(req.Conversations))
	for i, conversation := range req.Conversations {
		messages := make([]Message, 0, len(conversation))
		for _, m := range conversation {
			messages = append(messages, Message{Role: m.Role, Content: m.Content})
		}
		system, collated := collate(messages)
		// the values Ollama passes a template that reads .Messages
		values := map[string]any{
			"System": system, "Messages": collated, "Tools": nil, "Response": "", "Think": false,
			"IsThinkSet": false, "Query": "", "Document": "", "Instruction": "",
		}
		var b strings.Builder
		if err := tmpl.Execute(&b, values); err != nil {
			fail("conversation %d: %v", i, err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing the renders: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "modelfile_render: "+format+"\n", args...)
	os.Exit(1)
}
