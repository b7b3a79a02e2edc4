// Lists the operations of openapi.json; a self-hosted stand-in for Swagger UI.
"use strict";

async function main() {
  const target = document.getElementById("endpoints");
  const spec = await (await fetch("openapi.json")).json();
  target.replaceChildren();
  for (const [path, operations] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(operations)) {
      const section = document.createElement("section");
      const title = document.createElement("h2");
      title.textContent = `${method.toUpperCase()} ${path}`;
      const summary = document.createElement("p");
      summary.textContent = op.summary || "";
      section.append(title, summary);
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        const pre = document.createElement("pre");
        pre.textContent = JSON.stringify(body, null, 2);
        section.append(pre);
      }
      target.append(section);
    }
  }
}

main();
