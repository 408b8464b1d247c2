// Typeset the page's math with the vendored KaTeX: no network, no CDN.
// Markdown pages: pymdownx.arithmatex (generic mode) leaves \( … \) and \[ … \] in
// span/div.arithmatex. Notebook pages (mkdocs-jupyter) keep Jupyter's $ … $ and $$ … $$.
// document$ is Material's page observable: it also fires after instant navigation.
document$.subscribe(({ body }) => {
  const options = { throwOnError: false, errorColor: "#cc0000" };
  renderMathInElement(body, {
    ...options,
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
  });
  body.querySelectorAll(".jupyter-wrapper").forEach((notebook) =>
    renderMathInElement(notebook, {
      ...options,
      delimiters: [
        { left: "$$", right: "$$", display: true },
        { left: "$", right: "$", display: false },
      ],
    })
  );
});
