// Read an env file with Node's dotenv (the path in argv[2]) and print what it parsed as JSON.
const fs = require('fs');
const dotenv = require('dotenv');
process.stdout.write(JSON.stringify(dotenv.parse(fs.readFileSync(process.argv[2]))));
